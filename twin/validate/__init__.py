"""`pipetwin validate FILE.yaml`: the simulator against the real runtime, same workloads.

For every policy and load level, the same requests run through the simulator and the
runtime; errors.csv, ranking.csv, plots/ and report.md are written under `out`. The config
keys are documented in twin/validate/config.py.

Modules: config (keys, checks, cell names), run (the runs, `run_validation`), compare
(error rows, ranking), report (table, plots, report.md).
"""
