"""The training loop and what it needs: checkpoints, pre-emption, metrics."""
