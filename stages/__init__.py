"""Pipeline stages: one script per stage, each run as ``python -m stages.<name>``."""
