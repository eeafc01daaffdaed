"""Benchmark binaries (`python -m experiments.bench.NAME --flagfile=experiments/configs/NAME.flags`) and their problem generators."""
