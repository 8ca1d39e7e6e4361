"""Prefect flows that orchestrate the DVC stages (DVC owns caching, Prefect owns orchestration)."""
