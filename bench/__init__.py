"""Benchmarks of the kd pipeline (not tests): `python bench/run.py` runs them; see bench/run.py."""
