"""Pipeline stages: one script per stage, each run as ``python -m stages.<name>``."""

# OpenMP's wait policy is left to libgomp's default (spin a bounded while, then sleep), by measurement
# (benchmarks/bench_step_overhead.py, docs/benchmarks.md): on a free CPU a MiniLM step takes 0.80x (bf16)
# to 0.88x (fp32) the time it takes under PASSIVE, and beside two busy processes the two are within noise.
# ACTIVE (spin without limit) is what turns a shared CPU into a crawl; a user's own setting is kept.
