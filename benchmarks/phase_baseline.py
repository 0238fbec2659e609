"""The baseline of ``benchmarks/e2e_profile.py``: the same step's work in plain PyTorch.

One GRPO / dGRPO step written the direct way with ``transformers`` models loaded from the
same Hugging Face directories as our run (so the same weights, fp32, same torch threads,
same process), phase by phase:

- ``rollout``: ``generate`` over the step's prompts (left-padded, G copies of each), sampling
  at temperature 1 with no top-k / top-p, exactly ``new_tokens`` per completion
  (``min_new_tokens`` = ``max_new_tokens``, a KV cache), then the reward of every completion
  and the group-normalised advantages;
- ``refit``: a copy of every student parameter into a preallocated buffer of its shape (the
  least a weight update into a separate engine copy costs);
- ``scoring``: none (no reference model, one update per rollout batch: as our run);
- ``teacher``: the teacher's forward to its final hidden states (no grad; its output layer
  runs in ``loss/backward``, as in our fused loss);
- ``loss/backward``: the student's forward with grad, both output layers on the completion
  positions, full-vocabulary log-softmax, the policy-gradient surrogate (token mean) plus,
  for dGRPO, ``kl_coef`` x the full-vocabulary KL(teacher || student), and ``backward``;
- ``optimizer``: ``torch.optim.AdamW.step`` and ``zero_grad``.

Only the seconds matter here: nothing is compared with our run's numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

BASELINE_PHASES = ("rollout", "refit", "scoring", "teacher", "loss/backward", "optimizer")


class PlainStep:
    """The plain-PyTorch step (see the module doc) on ``student_hf`` (trained) and, when
    given, ``teacher_hf`` (frozen); ``reward(text) -> float`` scores one completion."""

    def __init__(self, student_hf: str, teacher_hf: str | None, reward: Callable[[str], float],
                 decode: Callable[[list[int]], str], lr: float, kl_coef: float):
        from transformers import AutoModelForCausalLM

        self.student = AutoModelForCausalLM.from_pretrained(student_hf, dtype=torch.float32)
        self.teacher = (AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float32)
                        .eval().requires_grad_(False) if teacher_hf else None)
        self.reward, self.decode, self.kl_coef = reward, decode, kl_coef
        self.optim = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=0.0)
        self.engine_copy = [torch.empty_like(p) for p in self.student.parameters()]
        self.pad = 0

    def step(self, prompts: list[list[int]], group: int, new_tokens: int) -> dict[str, float]:
        """One step on ``prompts`` (token ids); seconds per phase of ``BASELINE_PHASES``."""
        seconds = {name: 0.0 for name in BASELINE_PHASES}
        start = time.perf_counter()
        rows, prompt_lens, advantages = self._rollout(prompts, group, new_tokens)
        seconds["rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        tokens, mask, targets = self._training_batch(rows, prompt_lens)
        teacher_hidden = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_hidden = self.teacher.model(input_ids=tokens,
                                                    attention_mask=mask).last_hidden_state
        seconds["teacher"] = time.perf_counter() - start

        start = time.perf_counter()
        self._loss(tokens, mask, targets, advantages, teacher_hidden).backward()
        seconds["loss/backward"] = time.perf_counter() - start

        start = time.perf_counter()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        seconds["optimizer"] = time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            for buffer, param in zip(self.engine_copy, self.student.parameters()):
                buffer.copy_(param)
        seconds["refit"] = time.perf_counter() - start
        return seconds

    def _rollout(self, prompts: list[list[int]], group: int, new_tokens: int):
        """Completions (prompt + completion ids per row, G rows per prompt in order), the
        prompt length of each row and each row's group-normalised advantage ``[rows]``."""
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding, as generate expects
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention[row, longest - len(prompt):] = 1
        with torch.no_grad():
            out = self.student.generate(
                input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, num_return_sequences=group, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=self.pad)
        completions = out[:, longest:]
        if completions.shape[1] != new_tokens:
            raise RuntimeError(f"generate returned {completions.shape[1]} new tokens, "
                               f"not {new_tokens}")
        rows, prompt_lens = [], []
        for row in range(out.shape[0]):
            prompt = prompts[row // group]
            rows.append(prompt + completions[row].tolist())
            prompt_lens.append(len(prompt))
        rewards = torch.tensor([self.reward(self.decode(c.tolist())) for c in completions])
        grouped = rewards.view(-1, group)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True)
                                                                  + 1e-6)
        return rows, prompt_lens, advantages.flatten()

    def _training_batch(self, rows: list[list[int]], prompt_lens: list[int]):
        """Right-padded ``tokens`` / attention ``mask`` ``[rows, T]`` and the completion's
        ``targets``: (row, position) index pairs of the predicting positions and the token
        each predicts."""
        longest = max(map(len, rows))
        tokens = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for index, row in enumerate(rows):
            tokens[index, :len(row)] = torch.tensor(row)
            mask[index, :len(row)] = 1
        row_index = torch.cat([torch.full((len(r) - p,), i) for i, (r, p)
                               in enumerate(zip(rows, prompt_lens))])
        position = torch.cat([torch.arange(p - 1, len(r) - 1) for r, p in zip(rows, prompt_lens)])
        return tokens, mask, (row_index, position, tokens[row_index, position + 1])

    def _loss(self, tokens, mask, targets, advantages, teacher_hidden) -> torch.Tensor:
        """Token-mean surrogate (+ ``kl_coef`` x full-vocabulary KL to the teacher)."""
        row_index, position, target = targets
        hidden = self.student.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        logp = torch.log_softmax(self.student.lm_head(hidden[row_index, position]), dim=-1)
        token_logp = logp.gather(1, target[:, None]).squeeze(1)
        loss = -(torch.exp(token_logp - token_logp.detach()) * advantages[row_index]).mean()
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logp = torch.log_softmax(
                    self.teacher.lm_head(teacher_hidden[row_index, position]), dim=-1)
            kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
            loss = loss + self.kl_coef * kl
        return loss
