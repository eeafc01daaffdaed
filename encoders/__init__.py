"""Flax (NNX) ports of the Whisper, XLS-R and MMS speech encoders with front ends, pooling and sharding."""
