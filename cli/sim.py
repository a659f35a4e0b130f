"""`pipetwin sim`: simulate one configuration and write a results folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import add_workload_flags, formats, param, sim_config
from cli.errors import UsageError
from core.metrics import format_summary
from sim import SimConfig, fitted_model, simulate
from sim.output import parse_window, save_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file of SimConfig fields (flags override it)")
    p.add_argument("--profile", help="shipped table name (see `pipetwin profiles`) or a table folder")
    p.add_argument("--pp", type=int, help="check the profile has this many stages")
    p.add_argument("--policy", help="token_throttling | sarathi | vllm | time_balanced | dotted.path.Class")
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter (repeatable); values parsed as YAML")
    add_workload_flags(p, "request rate in req/s, or inf (with --trace: synthetic arrivals "
                          "at this rate replace the trace's, lengths stay real)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-pages", type=int, help="KV pages (default: from the profile's GPU memory)")
    g.add_argument("--memory-fraction", type=float, help="GPU memory share for weights + KV, (0, 1]")
    p.add_argument("--page-size", type=int, help="tokens per KV page")
    p.add_argument("--time-limit", type=float, help="stop after this many simulated seconds")
    p.add_argument("--out", help="results folder (default results/sim/<policy>_<profile>)")
    p.add_argument("--formats", type=formats, default=None,
                   help="table formats: csv,parquet (default parquet when pyarrow is installed, else csv)")
    p.add_argument("--tokens", action="store_true", help="also write the per-token table (millions of rows "
                                                         "on a long trace)")
    p.add_argument("--perfetto", action="store_true", help="also write perfetto.json (ui.perfetto.dev: one "
                                                           "track per stage, KV and queue counters)")
    p.add_argument("--perfetto-window", type=window, metavar="START:END",
                   help="perfetto.json for this window of simulated seconds only (implies --perfetto)")


def window(text: str) -> tuple[float, float]:
    try:
        return parse_window(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    d = sim_config(args)
    try:
        cfg = SimConfig.from_dict(d)  # validates the workload too
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    result = simulate(cfg)
    model, pp, meta = fitted_model(cfg.profile)
    print(f"profile {cfg.profile}: {meta.get('model', {}).get('name')} on {meta.get('device')}, pp={pp}, "
          f"{meta.get('source')}; latency fit {model.error}")
    print(f"policy {cfg.policy} {json.dumps(cfg.policy_params)}; {result.trace.meta.get('num_pages')} KV pages; "
          f"simulated in {result.wall_s:.2f} s")
    print(format_summary(result.summary))
    out = Path(args.out) if args.out else Path("results") / "sim" / f"{cfg.policy}_{Path(cfg.profile).name}"
    written = save_outputs(result, out, formats=args.formats, tokens=args.tokens, perfetto=args.perfetto,
                           perfetto_window=args.perfetto_window)
    perfetto = any(p.name == "perfetto.json" for p in written)
    print(f"results in {out}/" + (" (perfetto.json opens in ui.perfetto.dev)" if perfetto else
                                  " (--tokens: per-token table, --perfetto: timeline)"))
    return 0
