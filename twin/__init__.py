"""The twin tools: the real runtime and the simulator on the same requests.

bench (`pipetwin bench`: the runtime on a core workload), bench_serve (`pipetwin bench
serve`: an HTTP load client against `pipetwin serve`), validate (`pipetwin validate`:
simulator against runtime, split into config, run, compare, report), and what they share:
workload (the requests), results (the results folder).
"""
