"""Per-token terms of vocabulary-sharded logits (log-prob, entropy, full KL both ways,
top-k log-probs, teacher log-prob) and their gradients, against plain float64 formulas."""

import pytest
import torch
import torch.distributed as dist
from cases import portable, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dgrpo.parallel.vocab import vocab_parallel_terms
from megatron_dgrpo.parallel.launch import run_distributed


def random_inputs(seed, tokens, vocab, topk):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    topk_ids = torch.stack([torch.randperm(vocab, generator=gen)[:topk] for _ in range(tokens)])
    # random cotangents: one scalar probes every output's gradient at once
    cotangents = [torch.randn(tokens, generator=gen, dtype=torch.float64) for _ in range(3)]
    cotangents.append(torch.randn(tokens, topk, generator=gen, dtype=torch.float64))
    return student, teacher, targets, topk_ids, cotangents


def plain_terms(student, teacher, targets, topk_ids, direction):
    log_p, log_q = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1) if direction == "reverse" else (q * (log_q - log_p)).sum(-1)
    return {"logp": log_p.gather(1, targets[:, None])[:, 0], "entropy": -(p * log_p).sum(-1),
            "kl": kl, "topk": log_p.gather(1, topk_ids),
            "teacher_logp": log_q.gather(1, targets[:, None])[:, 0]}


def probe(terms, cotangents):
    """A scalar touching every differentiable term with a random weight."""
    return sum((c * t).sum() for c, t in zip(cotangents, terms))


def sharded_terms(student, teacher, targets, topk_ids, cotangents, direction, rank, world_size, group):
    local = student.shape[1] // world_size
    shard = slice(rank * local, (rank + 1) * local)
    logits = student[:, shard].clone().requires_grad_()
    terms = vocab_parallel_terms(logits, teacher[:, shard], targets, topk_ids, direction, group)
    differentiable = (terms.logp, terms.entropy, terms.teacher_kl, terms.topk_logp)
    probe(differentiable, cotangents).backward()
    values = dict(zip(("logp", "entropy", "kl", "topk"), (t.detach() for t in differentiable)))
    values["teacher_logp"] = terms.teacher_logp
    return values, logits.grad


def check_against_plain(values, grad, student, teacher, targets, topk_ids, cotangents, direction, shard):
    student = student.clone().requires_grad_()
    expected = plain_terms(student, teacher, targets, topk_ids, direction)
    probe((expected["logp"], expected["entropy"], expected["kl"], expected["topk"]), cotangents).backward()
    for name, value in values.items():
        assert relative_error(torch.as_tensor(value), expected[name]) < 1e-10, name
    assert relative_error(torch.as_tensor(grad), student.grad[:, shard]) < 1e-10


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), tokens=st.integers(1, 6), vocab=st.integers(2, 30),
       direction=st.sampled_from(["reverse", "forward"]), data=st.data())
def test_unsharded_terms_and_gradients_match_plain_formulas(seed, tokens, vocab, direction, data):
    topk = data.draw(st.integers(1, vocab))
    inputs = random_inputs(seed, tokens, vocab, topk)
    values, grad = sharded_terms(*inputs, direction, rank=0, world_size=1, group=None)
    check_against_plain(values, grad, *inputs, direction, slice(None))


def _terms_on_shards(rank, world_size, cases):
    torch.set_num_threads(1)
    return portable([sharded_terms(*inputs, direction, rank, world_size, dist.group.WORLD)
                     for inputs, direction in cases])


@pytest.mark.multiproc
def test_tp2_sharded_terms_and_gradients_match_plain_formulas():
    cases = [(random_inputs(seed, tokens=5, vocab=10, topk=4), direction)
             for seed, direction in ((0, "reverse"), (1, "forward"))]
    per_rank = run_distributed(_terms_on_shards, 2, args=(cases,))
    for rank, results in enumerate(per_rank):
        for (inputs, direction), (values, grad) in zip(cases, results):
            shard = slice(rank * 5, (rank + 1) * 5)
            check_against_plain(values, grad, *inputs, direction, shard)
