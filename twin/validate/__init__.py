"""`pipetwin validate FILE.yaml`: the simulator against the real runtime, same workloads.

Modules: config (keys, checks, cell names), run (the runs, `run_validation`), compare
(error rows, ranking), report (table, plots, report.md).

For every policy and load level, the SAME requests (lengths and arrival times, one seed)
run through the simulator (the measured profile, num_pages = the runtime's page count,
the scheduler on stage 0's thread as in the runtime: SimConfig.driver_on_stage0)
and through the runtime (requests injected at their arrival instants, fixed output
lengths). Written under `out`:

  runs/<policy>_r<rate>/{sim,real}/   results folders (as `pipetwin sim` / `pipetwin bench`)
  errors.csv                          one row per (policy, load): signed % errors (sim - real)/real
  ranking.csv                         per load: policies ranked by throughput, sim vs real
  plots/                              timelines (sim above real), TTFT/TPOT CDFs, bubble bars
  report.md

Config keys (YAML):
  name, description, model, pp, profile, layer_split, threads, device (cpu, or cuda: one
  GPU per stage over NCCL; `profile` then a table of that model and pp, e.g. from
  `pipetwin profile --device cuda`), dtype (default the model config's), num_pages (null =
  the runtime's default), page_size, seed, workload (a core workload spec; its arrival rate
  is set per load), loads (absolute request rates, req/s; "inf" allowed),
  policies (list of {name, label, params}), out, goals (optional thresholds),
  calibrate (optional): {seed, loads} -- before validating, run the runtime on OTHER
  requests (workload seed `seed`, default seed + 1) at `loads` (default: all) with every
  policy, and time the simulator by an in-situ table fitted on those runs' stage rows
  (profiles.in_situ: stages measured while the pipeline runs) instead of `profile` alone;
  in every pass over the cells, each cell's calibration run goes just before its real
  run, so slow drift of the machine's speed reaches the table and the runs it is
  compared with alike (run_plan);
  repeats (default 1): real runs per policy and load, the same requests each time, in
  passes over all cells (so a cell's runs sample the whole run); errors are against their
  mean, and the report shows how far they spread;
  sim_repeats (default 1): simulator runs per policy and load. Above 1, each run draws
  the table's measured stage-time jitter (SimConfig.stage_jitter, jitter_seed 0, 1, ...),
  so the simulator, like the runtime, gives a spread of outcomes; errors are mean against
  mean, and runs/<cell>/sim_repeats.csv keeps every run's summary. Needs a table with
  jitter.csv: calibrate, or a profile that has one.
"""
