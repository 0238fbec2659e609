"""The only place that knows about ranks: TP vocabulary shards, CP sequence shards, and the
fused hidden-states -> loss path. Process groups are arguments (``None`` = no parallelism);
the loss modules import no Megatron, so they run in plain gloo tests.

Entry points: :func:`materialized.loss_from_logits` (logits in) and
:func:`fused.loss_from_hidden` (hidden states + output weights in); normalisers and CP
layout in :mod:`context`; the vocabulary-parallel math in :mod:`vocab`.
"""
