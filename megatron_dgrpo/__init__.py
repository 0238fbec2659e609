"""megatron-dgrpo: long-context post-training (SFT, KD, GRPO, OPD, dGRPO) on Megatron-core."""

__version__ = "0.1.0"
