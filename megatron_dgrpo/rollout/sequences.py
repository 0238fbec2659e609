"""Prompt + response token lists -> the right-padded tensors a training step consumes.

Row ``i`` holds ``prompt_i + response_i`` followed by padding. Position ``t`` predicts token
``t + 1``: ``targets[i, t] = tokens[i, t + 1]``, and ``loss_mask[i, t]`` is True exactly when
that target is a response token. Right padding never changes the logits of earlier
positions under causal attention, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SequenceBatch:
    """``tokens``, ``positions``, ``targets``: int64 ``[B, T]``; ``loss_mask``: bool ``[B, T]``."""

    tokens: Tensor
    positions: Tensor
    targets: Tensor
    loss_mask: Tensor

    def map(self, function: Callable[[Tensor], Tensor]) -> SequenceBatch:
        """The batch with ``function`` applied to each of its ``[B, T]`` tensors (a slice, a
        context-parallel shard, a device move)."""
        return SequenceBatch(*(function(getattr(self, f.name)) for f in fields(self)))

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same batch with every tensor on ``device``."""
        return self.map(lambda tensor: tensor.to(device))

    def per_token(self, values: Sequence[Sequence[float]], dtype=torch.float32) -> Tensor:
        """Scatter per-response-token values (e.g. engine log-probs) into ``[B, T]``
        at the loss positions; 0 elsewhere."""
        out = torch.zeros(self.loss_mask.shape, dtype=dtype, device=self.loss_mask.device)
        for row, row_values in enumerate(values):
            positions = torch.nonzero(self.loss_mask[row]).flatten()
            if len(positions) != len(row_values):
                raise ValueError(f"row {row}: {len(row_values)} values for "
                                 f"{len(positions)} response tokens")
            out[row, positions] = torch.tensor(list(row_values), dtype=dtype, device=out.device)
        return out


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int = 0, align: int = 1) -> SequenceBatch:
    """Pack ``B`` (prompt, response) pairs; every prompt must be non-empty. The width is
    the longest sequence rounded up to a multiple of ``align`` (context/sequence
    parallelism split the sequence dimension into equal pieces)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts (>0), got {len(prompts)} prompts "
                         f"and {len(responses)} responses")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = -(-max(lengths) // align) * align
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError(f"row {row}: empty prompt")
        sequence = list(prompt) + list(response)
        tokens[row, :len(sequence)] = torch.tensor(sequence)
        loss_mask[row, len(prompt) - 1:len(sequence) - 1] = True
    targets = torch.roll(tokens, shifts=-1, dims=1)
    targets[:, -1] = pad_id
    positions = torch.arange(width).unsqueeze(0).expand(len(prompts), -1).contiguous()
    return SequenceBatch(tokens=tokens, positions=positions, targets=targets, loss_mask=loss_mask)
