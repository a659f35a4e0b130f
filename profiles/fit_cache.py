"""A disk cache of latency-model fits: a fit takes ~0.5 s, a fresh `pipetwin sim` or worker
process needs one per profile, and a table's fit never changes unless its files or the
fitting code do (both are in the key).

Location: $PIPETWIN_CACHE_DIR/fits, else $XDG_CACHE_HOME/pipetwin/fits, else
~/.cache/pipetwin/fits. A cache that cannot be read or written is skipped silently: the
fit is recomputed, as without it.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

from profiles import latency_model
from profiles.latency_model import FitError, LatencyModel, fit
from profiles.schema import Profile, resolve


def cache_dir() -> Path:
    root = os.environ.get("PIPETWIN_CACHE_DIR")
    if root:
        return Path(root) / "fits"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pipetwin" / "fits"


def fit_key(folder: Path) -> str:
    h = hashlib.sha256(Path(latency_model.__file__).read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:32]


def cached_fit(name: str, profile: Profile) -> tuple[LatencyModel, FitError]:
    """`fit(profile)` (default holdout and seed), from the cache when this table and this
    fitting code were fitted before."""
    try:
        path = cache_dir() / f"{fit_key(resolve(name))}.pkl"
        with open(path, "rb") as f:
            model, error = pickle.load(f)
        if isinstance(model, LatencyModel):
            return model, error
    except Exception:   # missing, unreadable or stale: fit
        path = None if "path" not in locals() else path
    model, error = fit(profile)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(pickle.dumps((model, error)))
            os.replace(tmp, path)
        except OSError:
            pass
    return model, error
