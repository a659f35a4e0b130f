"""`pipetwin profiles`: list the shipped latency tables."""
from __future__ import annotations

import argparse

from profiles import fit, list_tables, load_profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", action="store_true", help="also fit each table and show its held-out error")


def run(args: argparse.Namespace) -> int:
    rows = [("table", "pp", "model", "device", "source", "KV pages")
            + (("fit MAPE", "worst") if args.fit else ())]
    for name in list_tables():
        prof = load_profile(name)
        m = prof.meta
        row = (name, str(prof.pp), str(m.get("model", {}).get("name", "?")), str(m.get("device", "?")),
               str(m.get("source", "?")), str(prof.kv_pages()))
        if args.fit:
            _, err = fit(prof)
            row += (f"{err.mape:.2%}", f"{err.max_ape:.2%}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(rows) - 1} tables; KV pages at page size 16, memory fraction 0.9")
    return 0
