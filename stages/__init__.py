"""Pipeline stages: one script per stage, each run as ``python -m stages.<name>``."""

import os

# OpenMP threads that spin while waiting turn a shared CPU into a crawl (measured here: 8 s instead of
# 1.4 s per MiniLM step with one other busy process); sleeping waits cost little when the CPU is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
