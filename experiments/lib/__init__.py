"""Library code shared by the experiment binaries: the CLD training pipeline, flags, benchmark reports."""
