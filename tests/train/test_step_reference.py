"""The trainer's updates, one by one, against an independent float64 reference.

A real ``dgrpo train`` run (TP=1, Megatron DDP + optimizer, embedded rollouts) records, for
every optimizer update, the student's weights before it, the sequences and per-token signals
it trained on, the loss and metrics it reported, the gradients in DDP's buffers and the
weights after it. The reference then recomputes each update from scratch: the weights are
converted to a ``transformers`` Qwen3 in float64, whose logits (divided by the policy
temperature) go through the plain float64 loss of ``tests/parallel/plain_loss.py``; its
gradients are mapped back to Megatron's parameters; Adam is re-applied in float64 from the
trainer's gradients. Inputs the reference takes from the trainer (rollouts, rewards) are
themselves checked where they have a definition: group advantages from the rewards, PPO's
``pi_old`` and the reference log-probs from a float64 forward of the weights before the
first update, aggregation weights from the mask.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from megatron_dgrpo.algorithms.inputs import TokenBatch
from megatron_dgrpo.algorithms.objectives import LossConfig
from megatron_dgrpo.models import mapping
from megatron_dgrpo.models.mapping import TPSplit
from megatron_dgrpo.models.presets import get_preset
from megatron_dgrpo.parallel.launch import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from plain_loss import plain_token_losses, plain_weights  # noqa: E402

pytestmark = pytest.mark.multiproc

LR = 1e-2
SIGNALS = ("loss_mask", "weights", "targets", "advantages", "old_logp", "rollout_logp",
           "ref_logp", "teacher_logp")


def _config(root, tokenizer_dir, vocab, name, loss, **top):
    student = dataclasses.asdict(dataclasses.replace(get_preset("tiny-qwen3"), vocab_size=vocab))
    teacher = dataclasses.asdict(dataclasses.replace(get_preset("small-qwen3"), vocab_size=vocab))
    return {"run_dir": str(root / name), "steps": 1, "save_every": 1, "keep_last": 1,
            "prompts_per_step": 2, "tokenizer": str(tokenizer_dir),
            "student": {"preset": None, "model": student},
            "teacher": {"preset": None, "model": teacher},
            "loss": loss, "loss_impl": "fused", "loss_chunk_tokens": 5,
            "sampling": {"n": 2, "max_new_tokens": 5, "temperature": 1.0},
            "rewards": {"per_task": {}, "default": "reference_test_parity"},
            "data": {"paths": [str(root / "data")]}, "optim": {"lr": LR}, **top}


def _register_reward():
    """A reward that varies within a group of a random model's answers (so advantages do)."""
    from megatron_dgrpo.data.rewards import REWARDS, register_reward

    if "reference_test_parity" not in REWARDS:
        register_reward("reference_test_parity")(
            lambda answer, reference: float(sum(map(ord, answer)) % 2))


def _capture(rank, world_size, configs):
    """Run each config, recording every update (see the module docstring)."""
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.models.provider import destroy_parallel
    from megatron_dgrpo.train.config import RunConfig
    from megatron_dgrpo.train.loop import Trainer
    from megatron_dgrpo.train.metrics import read_metrics
    from megatron_dgrpo.train.runner import run_training
    from megatron_dgrpo.train.update import StudentOptimizer

    _register_reward()
    updates: list[dict] = []
    accumulate, step = Trainer._accumulate_gradients, StudentOptimizer.step
    token_signals = Trainer._token_signals

    def recording_signals(self, batch):
        self.recorded_rewards = None if batch.rewards is None else batch.rewards.clone()
        return token_signals(self, batch)

    def state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}

    def recording_accumulate(self, plan, sequences, signals):
        record = {"weights": state(self.student), "temperature": self.temperature,
                  "rewards": self.recorded_rewards,
                  "sequences": {f.name: getattr(sequences, f.name).clone()
                                for f in dataclasses.fields(sequences)},
                  "signals": {n: None if getattr(signals, n) is None else getattr(signals, n).clone()
                              for n in SIGNALS}}
        if getattr(self.teacher, "model", None) is not None:
            record["teacher"] = state(self.teacher.model)
        loss, metrics = accumulate(self, plan, sequences, signals)
        record["loss"], record["metrics"] = float(loss), metrics.as_dict()
        record["grads"] = {name: param.main_grad.detach().clone()
                           for name, param in self.student.named_parameters()}
        record["student"] = self.student
        updates.append(record)
        return loss, metrics

    def recording_step(self, step_number, total_steps, loss):
        out = step(self, step_number, total_steps, loss)
        record = updates[-1]
        record["after"] = state(record.pop("student"))
        return out

    Trainer._accumulate_gradients, StudentOptimizer.step = recording_accumulate, recording_step
    Trainer._token_signals = recording_signals
    results = []
    for config in configs:
        updates.clear()
        assert run_training(from_dict(RunConfig, config), show_progress=False) == 0
        destroy_parallel()
        results.append({"updates": list(updates), "metrics": read_metrics(config["run_dir"])})
    return results


def _hf(tensors: dict, model_config) -> dict:
    """Megatron local names (TP=1, PP=1) -> Hugging Face names, padding rows dropped."""
    out = {}
    for param in mapping.stage_params(model_config, 0, 1):
        tensor = tensors[param.local_name]
        if param.rule.split is TPSplit.VOCAB:
            tensor = tensor[:model_config.vocab_size]
        out.update(mapping.megatron_to_hf(param, tensor, model_config))
    return out


def _float64_model(weights: dict, model_config):
    import transformers

    hf_config = transformers.Qwen3Config(**model_config.to_hf_config())
    hf_config._attn_implementation = "eager"
    model = transformers.Qwen3ForCausalLM(hf_config).double()
    missing, unexpected = model.load_state_dict(
        {k: v.double() for k, v in _hf(weights, model_config).items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def _logits(model, tokens, vocab):
    return model(tokens).logits[..., :vocab]


def _reference_update(record, loss_config: LossConfig, student_config, teacher_config):
    """(loss, {hf name: grad}, metric values) of one update, in float64."""
    vocab = student_config.vocab_size
    tokens = record["sequences"]["tokens"]
    temperature = record["temperature"]
    model = _float64_model(record["weights"], student_config)
    student_logits = _logits(model, tokens, vocab) / temperature
    teacher_logits = None
    if "teacher" in record and loss_config.resolved_kl_estimator == "full":
        with torch.no_grad():
            teacher_logits = _logits(_float64_model(record["teacher"], teacher_config),
                                     tokens, vocab) / temperature
    signals = record["signals"]
    batch = TokenBatch(**{n: signals[n] for n in SIGNALS if n != "weights"},
                       weights=torch.zeros_like(signals["weights"]))
    mask = batch.loss_mask
    weights = plain_weights(mask, loss_config.aggregation, loss_config.length_norm)
    token_losses = torch.where(mask, plain_token_losses(loss_config, student_logits,
                                                        teacher_logits, batch), 0.0)
    loss = (weights * token_losses).sum()
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()
             if param.grad is not None}
    # what the loss's rounding error scales with (its terms cancel: advantages sum to 0)
    metrics_scale = float((weights * token_losses.detach().abs()).sum())
    logp = torch.log_softmax(student_logits.detach(), -1).gather(
        -1, torch.where(mask, batch.targets, 0)[..., None])[..., 0]
    metrics = {}
    if batch.advantages is not None:
        old = logp if batch.old_logp is None else torch.where(mask, batch.old_logp.double(), logp)
        ratio = torch.exp(logp - old)
        adv = batch.advantages.double()
        metrics["clip_frac_low"] = float((weights * ((ratio < 1 - loss_config.eps_low) & (adv < 0))).sum())
        metrics["clip_frac_high"] = float((weights * ((ratio > 1 + loss_config.eps_high) & (adv > 0))).sum())
        metrics["ratio_mean"] = float((weights * ratio).sum())
    return loss.detach(), grads, metrics, weights, metrics_scale


def _check_update(record, loss_config, student_config, teacher_config, what):
    ref_loss, ref_grads, ref_metrics, ref_weights, scale = _reference_update(
        record, loss_config, student_config, teacher_config)
    signals = record["signals"]
    torch.testing.assert_close(signals["weights"].double(), ref_weights, rtol=1e-6, atol=1e-9,
                               msg=f"{what}: aggregation weights")
    assert abs(record["loss"] - float(ref_loss)) <= 1e-5 * scale, (what, record["loss"], ref_loss)
    for name, value in ref_metrics.items():
        assert record["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{what}: {name}"
    grads = _hf(record["grads"], student_config)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert scale > 0, f"{what}: the reference gradient is zero"
    for name, ref_grad in ref_grads.items():
        error = float((grads[name].double() - ref_grad).abs().max()) / scale
        assert error < 1e-5, f"{what}: gradient of {name} off by {error:.2e} (relative to max)"


def _check_adam(updates, what):
    """Weights after each update = float64 Adam (torch's defaults, no weight decay) applied
    to the trainer's own gradients, update after update."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    moments: dict[str, tuple] = {}
    for t, record in enumerate(updates, start=1):
        for name, grad in record["grads"].items():
            g = grad.double()
            m, v = moments.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            moments[name] = (m, v)
            step = LR * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
            expected = record["weights"][name].double() - step
            torch.testing.assert_close(record["after"][name].double(), expected, rtol=0,
                                       atol=1e-6, msg=f"{what}: update {t} of {name}")


def _check_advantages(record, loss_config, group_size):
    """The advantages the loss read are the step's rewards normalised per group, as
    method.md defines them: ``(R - mean) / (std + eps)`` (or ``R - mean``, Dr. GRPO)."""
    advantages, rewards = record["signals"]["advantages"], record["rewards"]
    if advantages is None:
        return
    grouped = rewards.double().reshape(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if loss_config.adv_scale_by_std:
        std = grouped.std(1, unbiased=loss_config.adv_std_unbiased, keepdim=True)
        centred = centred / (std + loss_config.adv_eps)
    mask = record["signals"]["loss_mask"]
    expected = torch.where(mask, centred.reshape(-1)[:, None], 0.0)
    torch.testing.assert_close(advantages.double(), expected, rtol=0, atol=1e-6)


def _logp_of(weights, record, model_config):
    model = _float64_model(weights, model_config)
    tokens, mask = record["sequences"]["tokens"], record["signals"]["loss_mask"]
    with torch.no_grad():
        logits = _logits(model, tokens, model_config.vocab_size) / record["temperature"]
    logp = torch.log_softmax(logits, -1).gather(
        -1, torch.where(mask, record["signals"]["targets"], 0)[..., None])[..., 0]
    return torch.where(mask, logp, 0.0)


CASES = {
    "sft": {"objective": "sft"},
    "kd": {"objective": "kd"},
    "grpo": {"objective": "grpo", "kl_coef": 0.1},
    "opd": {"objective": "opd"},
    "dgrpo": {"objective": "dgrpo", "kl_coef": 0.5, "ref_kl_coef": 0.05},
}


@pytest.fixture(scope="module")
def runs(make_synth_setup):
    root, tokenizer_dir, vocab = make_synth_setup("step-reference", num=8, seed=17)
    configs = {name: _config(root, tokenizer_dir, vocab, name, loss)
               for name, loss in CASES.items()}
    # PPO: 2 mini-batches x 2 epochs at T = 0.6, a large step so the clip acts.
    configs["dgrpo_ppo"] = _config(
        root, tokenizer_dir, vocab, "dgrpo_ppo",
        {"objective": "dgrpo", "kl_coef": 0.5, "eps_low": 0.02, "eps_high": 0.02},
        prompts_per_step=4, ppo_mini_batches=2, ppo_epochs=2,
        sampling={"n": 2, "max_new_tokens": 5, "temperature": 0.6}, optim={"lr": LR})
    configs["grpo_drgrpo"] = _config(
        root, tokenizer_dir, vocab, "grpo_drgrpo",
        {"objective": "grpo", "kl_coef": 0.0, "aggregation": "constant_length",
         "adv_scale_by_std": False})
    (results,) = run_distributed(_capture, 1, args=(list(configs.values()),), timeout_s=1200)
    return {name: result for name, result in zip(configs, results)}, configs


def _configs_of(config_dict):
    from megatron_dgrpo.config import from_dict
    from megatron_dgrpo.train.config import RunConfig

    _register_reward()
    config = from_dict(RunConfig, config_dict)
    loss = config.loss
    if loss.aggregation == "constant_length" and loss.length_norm is None:
        loss = dataclasses.replace(loss, length_norm=config.sampling.max_new_tokens)
    return config, loss, config.student.model_config(), config.teacher.model_config()


@pytest.mark.parametrize("name", [*CASES, "grpo_drgrpo"])
def test_one_step_equals_the_float64_reference(runs, name):
    results, configs = runs
    config, loss, student, teacher = _configs_of(configs[name])
    (record,) = results[name]["updates"]
    _check_update(record, loss, student, teacher, name)
    _check_adam([record], name)
    _check_advantages(record, loss, config.sampling.n if config.loss.spec.on_policy else 1)
    if record["signals"]["ref_logp"] is not None:  # the frozen initial policy
        torch.testing.assert_close(record["signals"]["ref_logp"].double(),
                                   _logp_of(record["weights"], record, student),
                                   rtol=0, atol=1e-5)
    (logged,) = results[name]["metrics"]
    assert logged["loss"] == pytest.approx(record["loss"], rel=1e-6)


def test_ppo_updates_equal_the_float64_reference_and_the_clip_acts(runs):
    results, configs = runs
    config, loss, student, teacher = _configs_of(configs["dgrpo_ppo"])
    updates = results["dgrpo_ppo"]["updates"]
    assert len(updates) == 4  # 2 mini-batches x 2 epochs
    first = updates[0]
    assert first["temperature"] == 0.6
    # pi_old = a separate no-grad forward of the weights before the first update
    for record in updates:
        torch.testing.assert_close(record["signals"]["old_logp"].double(),
                                   _logp_of(first["weights"], record, student),
                                   rtol=0, atol=1e-5)
    for index, record in enumerate(updates):
        _check_update(record, loss, student, teacher, f"ppo update {index}")
    _check_adam(updates, "ppo")
    clipped = sum(r["metrics"]["clip_frac_low"] + r["metrics"]["clip_frac_high"]
                  for r in updates[2:])
    assert clipped > 0, "the second epoch's ratios never left the clip range"
    (logged,) = results["dgrpo_ppo"]["metrics"]
    assert logged["optim/updates"] == 4
    assert logged["loss"] == pytest.approx(sum(r["loss"] for r in updates) / 4, rel=1e-6)
