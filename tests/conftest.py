"""Shared pytest set-up: quiet Megatron's missing-TE warnings, keep CPU threads modest."""

import warnings

import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(2)
