"""The TRL side of ``benchmarks/e2e_step.py``: the same GRPO steps with ``trl.GRPOTrainer``.

Runs in ``.venv-bench`` (``tools/install_bench.sh``), started by ``e2e_step.py`` as a
subprocess, so TRL never imports in the training environment::

    .venv-bench/bin/python benchmarks/trl_step.py --workload W.json --out RESULT.json

The workload file (written by ``e2e_step.py``) names the Hugging Face model directory and the
tokenizer, and gives the prompts as token ids, in step order, with G, the completion length,
the optimiser settings, the number of steps and the torch thread count. The result file holds
one record per optimizer step (wall seconds split into rollout, scoring and training; CPU
seconds; prompt tokens over the G copies; generated tokens) and the process's peak RSS.

Settings that make the work identical to ours: fp32, one process, no gradient checkpointing,
no gradient clipping, constant learning rate, beta=0 (no reference model), ``loss_type=dapo``
with clip range [0.8, 1.28] (= our token-mean aggregation and clip-higher defaults), group
standard-deviation scaling of advantages, one optimizer step per rollout batch, no dataset
shuffling, and ``min_new_tokens`` = ``max_completion_length`` so every completion has exactly
that many tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

# Phases of one step (seconds): ``rollout`` = tokenize + generate + decode; ``scoring`` =
# rewards, advantages and any log-probs computed before the loss; ``train`` = the rest of the
# step (forward, loss, backward, optimizer step).
PHASES = ("rollout_s", "scoring_s", "train_s")


def answer_length_parity(answer: str, reference: str) -> float:
    """1.0 when the answer has an odd number of characters, else 0.0.

    Both sides score with this one reward: a random model never answers correctly, and a
    reward that varies within a group keeps advantages, hence gradients, non-zero. Its cost is
    negligible next to the model's.
    """
    del reference
    return float(len(answer) % 2)


def parity_reward(completions: list[str], **_) -> list[float]:
    """TRL reward function (one float per completion) wrapping :func:`answer_length_parity`."""
    return [answer_length_parity(text, "") for text in completions]


def prompt_texts(tokenizer, prompt_ids: list[list[int]]) -> list[str]:
    """Texts that the tokenizer encodes back to exactly ``prompt_ids`` (GRPOTrainer takes text).

    Raises ValueError if a prompt does not round-trip, since the two sides would then train on
    different tokens.
    """
    texts = [tokenizer.decode(ids) for ids in prompt_ids]
    encoded = tokenizer(text=texts)["input_ids"]  # as GRPOTrainer tokenizes text prompts
    mismatched = [i for i, (got, want) in enumerate(zip(encoded, prompt_ids)) if got != want]
    if mismatched:
        raise ValueError(f"prompts {mismatched} do not round-trip through the tokenizer")
    return texts


def make_trainer(workload: dict, output_dir: str, records: list[dict]):
    """A GRPOTrainer for ``workload`` that appends one record per optimizer step to ``records``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that times generation and scoring inside each step."""

        def _generate(self, prompts):
            start = time.perf_counter()
            result = super()._generate(prompts)
            records[-1]["rollout_s"] = time.perf_counter() - start
            records[-1]["prompt_tokens"] = sum(len(ids) for ids in result[0])
            records[-1]["generated_tokens"] = sum(len(ids) for ids in result[1])
            return result

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            records[-1]["scoring_s"] = time.perf_counter() - start - records[-1]["rollout_s"]
            return result

    class StepTimer(TrainerCallback):
        """Wall and CPU (all threads) seconds of each optimizer step, rollout through update."""

        def on_step_begin(self, args, state, control, **kwargs):
            records.append({"started": time.perf_counter(), "cpu_started": time.process_time()})

        def on_step_end(self, args, state, control, **kwargs):
            record = records[-1]
            record["step_s"] = time.perf_counter() - record.pop("started")
            record["cpu_s"] = time.process_time() - record.pop("cpu_started")
            record["train_s"] = record["step_s"] - record["rollout_s"] - record["scoring_s"]

    tokenizer = AutoTokenizer.from_pretrained(workload["tokenizer"])
    dataset = Dataset.from_dict({"prompt": prompt_texts(tokenizer, workload["prompt_ids"])})
    model = AutoModelForCausalLM.from_pretrained(workload["hf_model"], dtype=torch.float32)
    length = workload["max_new_tokens"]
    config = GRPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=workload["steps"], use_cpu=True, bf16=False, seed=workload["seed"],
        max_steps=workload["steps"], shuffle_dataset=False, gradient_checkpointing=False,
        per_device_train_batch_size=workload["prompts_per_step"] * workload["group"],
        gradient_accumulation_steps=1, num_generations=workload["group"],
        max_completion_length=length, generation_kwargs={"min_new_tokens": length},
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=workload["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=0.0,
        beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
        num_iterations=1)
    return TimedGRPOTrainer(model=model, reward_funcs=[parity_reward], args=config,
                            train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[StepTimer()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, help="workload JSON from e2e_step.py")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args()

    import torch

    with open(args.workload) as f:
        workload = json.load(f)
    torch.set_num_threads(workload["threads"])
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as output_dir:
        make_trainer(workload, output_dir, records).train()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.out, "w") as f:
        json.dump({"steps": records, "peak_rss_mib": peak_rss_mib}, f)


if __name__ == "__main__":
    main()
