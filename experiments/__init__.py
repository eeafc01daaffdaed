"""absl binaries: `python -m experiments.NAME --flagfile=experiments/configs/NAME.flags`."""
