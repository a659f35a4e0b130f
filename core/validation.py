"""Config-key checks shared by every loader: an unknown key names itself, the closest
valid key, and the allowed ones (policies, workloads, simulator and sweep configs)."""
from __future__ import annotations

import difflib
from typing import Any, Collection, Iterable, Mapping


def suggest(word: Any, allowed: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest allowed word, or ''."""
    close = difflib.get_close_matches(str(word), list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(d: Any, allowed: Collection[str], where: str, error: type[Exception] = ValueError,
               noun: str = "key") -> Mapping[str, Any]:
    """`d` must be a mapping whose keys are all in `allowed`."""
    if not isinstance(d, Mapping):
        raise error(f"{where} must be a mapping, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise error(f"unknown {noun} {key!r} in {where}{suggest(key, allowed)} (allowed {noun}s: {', '.join(allowed)})")
    return d
