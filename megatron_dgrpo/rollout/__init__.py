"""Rollout engines: the interface, sampling, and the embedded Megatron engine."""
