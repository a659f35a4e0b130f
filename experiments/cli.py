"""`pipetwin` command line: sim, sweep, plot, profiles, profile, bench, bench serve, serve, validate.

A subcommand is an entry of COMMANDS: name -> (help, add_arguments(parser), run(args) -> int).
User errors (bad flags, values, configs, missing files) exit 2 with one line naming the
flag or field; no tracebacks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

EXIT_USAGE = 2


class UsageError(ValueError):
    """Reported as `pipetwin CMD: error: MESSAGE`, exit 2."""


# ---------------------------------------------------------------- sim

def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None


def _formats(text: str) -> tuple[str, ...]:
    from core.trace import TABLE_FORMATS
    fmts = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fmts if f not in TABLE_FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(TABLE_FORMATS)}, got {text!r}")
    return fmts


def add_workload_flags(p: argparse.ArgumentParser, rate_help: str) -> None:
    """The workload flags `sim`, `bench` and `bench serve` share."""
    p.add_argument("--trace", help="replay a trace CSV (arrived_at, num_prefill_tokens, num_decode_tokens)")
    p.add_argument("--rate", help=rate_help)
    p.add_argument("--burstiness", type=float, help="gamma shape of the arrival gaps (1 = Poisson)")
    p.add_argument("--num-requests", type=int, help="number of requests (with --trace: the first N rows)")
    p.add_argument("--seed", type=int)


def add_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file of SimConfig fields (flags override it)")
    p.add_argument("--profile", help="shipped table name (see `pipetwin profiles`) or a table folder")
    p.add_argument("--pp", type=int, help="check the profile has this many stages")
    p.add_argument("--policy", help="token_throttling | sarathi | vllm | dotted.path.Class")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter (repeatable); values parsed as YAML")
    add_workload_flags(p, "request rate in req/s, or inf (with --trace: synthetic arrivals "
                          "at this rate replace the trace's, lengths stay real)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-pages", type=int, help="KV pages (default: from the profile's GPU memory)")
    g.add_argument("--memory-fraction", type=float, help="GPU memory share for weights + KV, (0, 1]")
    p.add_argument("--page-size", type=int, help="tokens per KV page")
    p.add_argument("--time-limit", type=float, help="stop after this many simulated seconds")
    p.add_argument("--out", help="results folder (default results/sim/<policy>_<profile>)")
    p.add_argument("--formats", type=_formats, default=("csv",), help="trace tables: csv,parquet (default csv)")


def sim_config(args: argparse.Namespace) -> dict[str, Any]:
    """The SimConfig dict: YAML file, then flags."""
    from sim.config import default_workload

    d: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"config: no such file {args.config!r}")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"config {args.config}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise UsageError(f"config {args.config}: must be a mapping of SimConfig fields")
    for flag, key in (("profile", "profile"), ("pp", "pp"), ("policy", "policy"), ("seed", "seed"),
                      ("num_pages", "num_pages"), ("memory_fraction", "memory_fraction"),
                      ("page_size", "page_size"), ("time_limit", "time_limit")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if args.param:
        params = dict(d.get("policy_params") or {})
        params.update(dict(args.param))
        d["policy_params"] = params
    w = dict(d.get("workload") or default_workload())
    if args.trace is not None:
        if not Path(args.trace).is_file():
            raise UsageError(f"--trace: no such file {args.trace!r} (relative to {Path.cwd()})")
        w = {"trace": str(Path(args.trace).resolve())}
    if args.rate is not None:
        rate: Any = args.rate
        try:
            rate = float(rate)
        except ValueError:
            raise UsageError(f"--rate must be a number > 0 or inf, got {args.rate!r}") from None
        if math.isinf(rate):
            rate = "inf"
        if "trace" in w:
            w.pop("time_scale", None)
            w.pop("rate_scale", None)
        w["arrival"] = {**(w.get("arrival") or {"kind": "gamma"}), "rate": rate}
    if args.burstiness is not None:
        if "arrival" not in w:
            raise UsageError("--burstiness shapes synthetic arrivals; with a trace give --rate too")
        w["arrival"] = {**w["arrival"], "burstiness": args.burstiness}
    if args.num_requests is not None:
        w["limit" if "trace" in w else "num_requests"] = args.num_requests
    d["workload"] = w
    return d


def cmd_sim(args: argparse.Namespace) -> int:
    from core.metrics import format_summary
    from core.trace import _json_default
    from sim import SimConfig, fitted_model, simulate

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
    result.trace.save(out, formats=args.formats)
    result.trace.to_perfetto(out / "perfetto.json")
    (out / "summary.json").write_text(json.dumps(_finite(result.summary), indent=2, default=_json_default) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"results in {out}/ (perfetto.json opens in ui.perfetto.dev)")
    return 0


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---------------------------------------------------------------- sweep / plot

def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="experiment YAML (see experiments/gllm_vs_sarathi.yaml)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--out", help="results folder (default results/<config stem>)")
    p.add_argument("--no-cache", action="store_true", help="recompute every run (the cache is rewritten)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the run count and the first runs")


def cmd_sweep(args: argparse.Namespace) -> int:
    import time

    from experiments.config import capacity_groups, expand, load_experiment
    from experiments.runner import run_sweep

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    exp = load_experiment(args.file)
    out = Path(args.out) if args.out else Path("results") / exp.name
    runs = expand(exp)
    print(f"{exp.name}: {len(runs)} runs ({len({r.label for r in runs})} policy variants x "
          f"{len(runs) // max(1, len({r.label for r in runs}))} settings)"
          + (f"; capacity search for {len(capacity_groups(exp, runs))} series (<= {exp.capacity.probes()} "
             f"probes each{', + max throughput' if exp.capacity.max_throughput else ''})" if exp.capacity else ""))
    if args.dry_run:
        from experiments.runner import iter_preview
        for line in iter_preview(runs):
            print(line)
        print("first run, resolved:")
        print("  " + yaml.safe_dump(runs[0].config, sort_keys=False).replace("\n", "\n  ").rstrip())
        return 0
    t0 = time.perf_counter()
    res = run_sweep(exp, out, workers=args.workers, use_cache=not args.no_cache)
    print(f"{res.computed} runs computed, {res.cached} from cache, {time.perf_counter() - t0:.1f} s")
    print(f"results: {out / 'results.csv'}")
    print(f"report:  {res.report}")
    return 0


def add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="a sweep's results folder (holds sweep.yaml and results.csv)")
    p.add_argument("--out", help="folder for the plots (default RESULTS/plots)")


def cmd_plot(args: argparse.Namespace) -> int:
    from experiments.config import load_experiment
    from experiments.report import make_report

    folder = Path(args.results)
    if not (folder / "sweep.yaml").is_file():
        raise UsageError(f"{folder}: not a sweep results folder (no sweep.yaml)")
    exp = load_experiment(folder / "sweep.yaml", check_files=False)
    exp.source = str(folder / "sweep.yaml")
    report = make_report(folder, exp, args.out)
    print(f"plots in {args.out or folder / 'plots'}; report: {report}")
    return 0


# ---------------------------------------------------------------- profiles

def add_profiles(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", action="store_true", help="also fit each table and show its held-out error")


def cmd_profiles(args: argparse.Namespace) -> int:
    from profiles import fit, list_tables, load_profile

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


# ---------------------------------------------------------------- profile (profiles/measure; torch imported on run)

def add_profile(p: argparse.ArgumentParser) -> None:
    from profiles.measure.options import add_arguments
    add_arguments(p)


def cmd_profile(args: argparse.Namespace) -> int:
    from profiles.measure.profiler import run_cli
    return run_cli(args)


# ---------------------------------------------------------------- bench / validate (torch imported on run)

def add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file (model, pp, policy, policy_params, workload, seed, "
                                             "num_pages, page_size, layer_split, threads, device, dtype); flags "
                                             "override it")
    from runtime.engine_args import add_engine_args

    add_engine_args(p, defaults=False, seed=False)   # the workload flags have --seed
    p.add_argument("--policy", help="token_throttling | sarathi | vllm | dotted.path.Class")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter (repeatable); values parsed as YAML")
    add_workload_flags(p, "request rate in req/s, or inf")
    p.add_argument("--out", help="results folder (default results/bench/<policy>_<model>)")
    p.add_argument("--formats", type=_formats, default=("csv",), help="trace tables: csv,parquet (default csv)")


_BENCH_KEYS = ("model", "pp", "policy", "policy_params", "workload", "seed", "num_pages", "page_size",
               "layer_split", "threads", "device", "dtype")


def bench_config(args: argparse.Namespace) -> dict[str, Any]:
    """The bench config dict: YAML file, then flags (workload flags as `pipetwin sim`'s)."""
    from core.policies import make_policy
    from core.validation import check_keys
    from core.workloads import Workload

    for name in ("profile", "memory_fraction", "time_limit"):   # sim-only fields of sim_config
        setattr(args, name, None)
    d = sim_config(args)
    check_keys({k: v for k, v in d.items()}, _BENCH_KEYS, "the bench config")
    for flag, key in (("model", "model"), ("layer_split", "layer_split"), ("threads", "threads"),
                      ("device", "device"), ("dtype", "dtype")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if not d.get("model"):
        raise UsageError("--model is required (or `model:` in the config)")
    d.setdefault("pp", 1)
    d.setdefault("policy", "token_throttling")
    d.setdefault("policy_params", {})
    d.setdefault("seed", 0)
    d.setdefault("num_pages", None)
    d.setdefault("page_size", 16)
    d.setdefault("device", "cpu")
    d.setdefault("dtype", None)
    from runtime.engine_args import check_engine_values
    try:
        check_engine_values(d)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        make_policy(d["policy"], d["policy_params"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"--policy/--param: {e}") from None
    try:
        Workload.from_dict({**d["workload"], "seed": d["seed"]})
    except (ValueError, TypeError) as e:
        raise UsageError(f"workload: {e}") from None
    return d


def cmd_bench(args: argparse.Namespace) -> int:
    from core.metrics import format_summary, summarize
    from experiments.bench import Bench, workload_requests, write_results

    d = bench_config(args)
    requests = workload_requests(d["workload"], d["seed"])
    with Bench(d["model"], d["pp"], d["policy"], d["policy_params"], num_pages=d["num_pages"],
               page_size=d["page_size"], layer_split=d.get("layer_split"), num_threads=d.get("threads"),
               seed=d["seed"], device=d["device"], dtype=d["dtype"]) as bench:
        trace = bench.run(requests, d["policy"], d["policy_params"], seed=d["seed"])
        d["num_pages"] = bench.num_pages
    summary = summarize(trace)
    summary["wall_s"] = trace.meta["wall_s"]
    print(f"runtime: model {trace.meta['model']}, pp={d['pp']}, policy {d['policy']} "
          f"{json.dumps(d['policy_params'])}; {d['num_pages']} KV pages; {len(requests)} requests in "
          f"{trace.meta['wall_s']:.1f} s")
    print(format_summary(summary))
    name = str(trace.meta["model"]).replace("dummy:", "").replace("/", "_")[:40]
    out = Path(args.out) if args.out else Path("results") / "bench" / f"{d['policy']}_{name}"
    write_results(out, trace, summary, d, formats=args.formats)
    print(f"results in {out}/ (perfetto.json opens in ui.perfetto.dev)")
    return 0


def add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="validation YAML (see experiments/twin_cpu.yaml)")
    p.add_argument("--out", help="results folder (default: the file's out, else results/<file stem>)")
    p.add_argument("--reuse-real", action="store_true",
                   help="skip the hardware: rebuild the in-situ table from the calibration runs an earlier run "
                        "of this config left in the results folder and run the simulator against its real "
                        "runs (iterate on the model without the hardware)")


def cmd_validate(args: argparse.Namespace) -> int:
    from experiments.validate import load_validation, run_validation

    cfg = load_validation(args.file)
    if args.out:
        cfg.out = args.out
    res = run_validation(cfg, log=print, reuse_real=args.reuse_real)
    print(res.table_text)
    print(f"report: {res.report}")
    return 0



# ---------------------------------------------------------------- serve / bench serve (server/, experiments/bench_serve.py)

def add_serve(p: argparse.ArgumentParser) -> None:
    from server.serve import add_arguments
    add_arguments(p, _param)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import check_args, run_cli

    try:
        check_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return run_cli(args)


def add_bench_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file with `workload` and `seed` (a `pipetwin bench` config "
                                             "works; its other keys are the server's business)")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    add_workload_flags(p, "request rate in req/s, or inf (all at once)")
    p.add_argument("--input-len", type=int, help="synthetic prompt length (mean with --range-ratio)")
    p.add_argument("--output-len", type=int, help="synthetic output length (mean with --range-ratio)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default on; --no-ignore-eos stops at EOS)")
    p.add_argument("--ttft-slo", type=float, metavar="MS", help="goodput SLO on TTFT, milliseconds")
    p.add_argument("--tpot-slo", type=float, metavar="MS", help="goodput SLO on TPOT, milliseconds")
    p.add_argument("--e2e-slo", type=float, metavar="MS", help="goodput SLO on E2E latency, milliseconds")
    p.add_argument("--stats-every", type=float, default=0.25, metavar="S",
                   help="poll the server's stats every S seconds for the samples table (default 0.25)")
    p.add_argument("--out", help="results folder (default results/bench_serve/<model>_r<rate>)")
    p.add_argument("--formats", type=_formats, default=("csv",), help="trace tables: csv,parquet (default csv)")


def bench_serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """{"url", "model", "workload", "seed", "max_concurrency", "ignore_eos", "slo"} from a YAML and flags."""
    from core.validation import check_keys
    from core.workloads import Workload

    for name in ("profile", "pp", "policy", "num_pages", "memory_fraction", "page_size", "time_limit"):
        setattr(args, name, None)
    args.param = []
    d = sim_config(args)
    check_keys(d, _BENCH_KEYS, "the bench serve config")
    w = dict(d["workload"])
    for flag, key in (("--input-len", "input_len"), ("--output-len", "output_len")):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be an integer >= 1, got {v}")
    if not 0 <= args.range_ratio < 1:
        raise UsageError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    for key, flag, name in (("prompt_len", "--input-len", "input_len"), ("output_len", "--output-len", "output_len")):
        v = getattr(args, name)
        if v is None:
            continue
        lo, hi = max(1, round(v * (1 - args.range_ratio))), round(v * (1 + args.range_ratio))
        w[key] = {"kind": "fixed", "value": v} if lo == hi else {"kind": "uniform", "low": lo, "high": hi}
    seed = d.get("seed", 0)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    try:
        Workload.from_dict({**w, "seed": seed})
    except (ValueError, TypeError) as e:
        raise UsageError(f"workload: {e}") from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be an integer >= 1, got {args.max_concurrency}")
    if not args.stats_every > 0:
        raise UsageError(f"--stats-every must be > 0 seconds, got {args.stats_every}")
    slo = {}
    for key in ("ttft", "tpot", "e2e"):
        v = getattr(args, f"{key}_slo")
        if v is not None:
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"--{key}-slo must be a number of milliseconds > 0, got {v}")
            slo[key] = v / 1e3
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {args.url!r}")
    return {"url": args.url, "model": args.model, "workload": w, "seed": seed,
            "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "slo": slo}


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from core.metrics import summarize
    from experiments import bench_serve as bs

    d = bench_serve_config(args)
    try:
        trace, outcomes = bs.run(d["url"], d["workload"], d["seed"], model=d["model"],
                                 max_concurrency=d["max_concurrency"], ignore_eos=d["ignore_eos"],
                                 stats_every_s=args.stats_every, log=print)
    except bs.ServeBenchError as e:
        raise UsageError(str(e)) from None
    summary = summarize(trace, d["slo"] or None)
    summary["wall_s"] = trace.meta["wall_s"]
    print(bs.report(summary, outcomes, d["slo"]))
    rate = (d["workload"].get("arrival") or {}).get("rate", "trace")
    name = str(trace.meta.get("model") or "server").replace("dummy:", "").replace("/", "_")[:40]
    out = Path(args.out) if args.out else Path("results") / "bench_serve" / f"{name}_r{rate}"
    config = {**d, "server": {k: trace.meta.get(k) for k in ("pp", "policy", "policy_params", "num_pages",
                                                             "page_size")}}
    bs.write(out, trace, summary, config, formats=args.formats)
    print(f"results in {out}/ (perfetto.json opens in ui.perfetto.dev)")
    return 0 if all(o.ok for o in outcomes) else 1


# ---------------------------------------------------------------- main

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "sim": ("simulate one configuration and write a results folder", add_sim, cmd_sim),
    "sweep": ("run an experiment grid (cached, parallel), capacity search, plots, report", add_sweep, cmd_sweep),
    "plot": ("regenerate a sweep's plots and report", add_plot, cmd_plot),
    "profiles": ("list the shipped latency tables", add_profiles, cmd_profiles),
    "profile": ("measure a latency table on this machine (torch runtime, needs the runtime extra)",
                add_profile, cmd_profile),
    "bench": ("run the real runtime on a workload and write a results folder like `sim`'s",
              add_bench, cmd_bench),
    "bench serve": ("load-test an OpenAI-compatible server (`pipetwin serve`): vLLM-style report and "
                    "a results folder like `bench`'s", add_bench_serve, cmd_bench_serve),
    "validate": ("simulator vs runtime on the same workloads: error table, plots, report",
                 add_validate, cmd_validate),
    "serve": ("serve a model over an OpenAI-compatible HTTP API (needs the runtime and serve extras)",
              add_serve, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetwin", allow_abbrev=False, description="Scheduling policies for "
                                     "pipeline-parallel LLM serving: simulate, sweep, plot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, run) in COMMANDS.items():
        if " " in name:   # "bench serve": a form of `bench`, reached through main()'s argv rewrite
            p = sub.add_parser(name.replace(" ", "-"), help=f"(`{parser.prog} {name}`) {help_}",
                               description=help_, allow_abbrev=False, prog=f"{parser.prog} {name}")
        else:
            p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        add(p)
        p.set_defaults(_run=run, _parser=p, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from experiments.config import ConfigError
    from experiments.runner import RunError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:   # `pipetwin bench serve ...` (a bench config named serve: ./serve)
        argv = ["bench-serve", *argv[2:]]
    args = build_parser().parse_args(argv)   # argparse exits 2 on bad flags, naming them
    try:
        return args._run(args)
    except (UsageError, ConfigError, FileNotFoundError) as e:
        args._parser.exit(EXIT_USAGE, f"pipetwin {args.command}: error: {e}\n")
    except ValueError as e:  # e.g. ProfileError, a bad value caught late
        args._parser.exit(EXIT_USAGE, f"pipetwin {args.command}: error: {e}\n")
    except RunError as e:  # a simulation raised: not a user error, show where
        import traceback
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"pipetwin {args.command}: {e} (finished runs are cached)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `pipetwin profiles | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted (finished runs are cached; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
