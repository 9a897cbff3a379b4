"""Measuring instruments, not the model: evaluation, sweeps, the benchmark, figures (python -m
tools.NAME)."""
