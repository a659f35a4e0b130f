"""`pipetwin profile`: measure a latency table on this machine with the real runtime.

Above runtime/ in the layers (it builds stages and times them), unlike the rest of
profiles/, which never imports torch: options (flags, checks; torch-free), profile_grid
(the shape grid), profile_timing (stage, transfer and scheduler timing), profiler (the
run and the table it writes).
"""
