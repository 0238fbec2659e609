"""LossConfig validation and the objective registry."""

import pytest

from megatron_dgrpo.algorithms.objectives import OBJECTIVES, LossConfig, get_objective


def test_defaults_are_valid_and_documented_values():
    config = LossConfig().validate()
    assert (config.objective, config.aggregation, config.form) == ("dgrpo", "token_mean", "loss")
    assert (config.eps_low, config.eps_high, config.kl_coef, config.tis_cap) == (0.2, 0.28, 0.5, 2.0)
    assert config.resolved_kl_estimator == "full"
    # kl_coef left unset: each objective's default (dgrpo 0.5, grpo's reference KL 0.04)
    assert {name: LossConfig(objective=name).kl_coef for name in OBJECTIVES} == {
        "sft": 0.0, "kd": 0.0, "grpo": 0.04, "opd": 0.0, "dgrpo": 0.5}
    assert LossConfig(objective="dgrpo", kl_coef=0.04).kl_coef == 0.04


def test_registry_holds_the_five_objectives_with_their_default_estimators():
    assert sorted(OBJECTIVES) == ["dgrpo", "grpo", "kd", "opd", "sft"]
    assert {name: LossConfig(objective=name).resolved_kl_estimator for name in OBJECTIVES} == {
        "sft": None, "kd": "full", "grpo": "k2", "opd": "full", "dgrpo": "full"}
    assert get_objective("kd").teacher_kl_direction == "forward"


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "ppo"}, "unknown objective 'ppo'"),
    ({"aggregation": "mean"}, "unknown aggregation 'mean'"),
    ({"form": "reward"}, "unknown form 'reward'"),
    ({"topk_tail": "drop"}, "unknown topk_tail 'drop'"),
    ({"kl_estimator": "k9"}, "unknown kl_estimator 'k9'"),
    ({"objective": "sft", "kl_estimator": "k3"}, "objective 'sft' has no KL term"),
    ({"objective": "kd", "kl_estimator": "k3"}, "unknown kl_estimator 'k3'"),
    ({"objective": "grpo", "kl_estimator": "full"}, "unknown kl_estimator 'full'"),
    ({"objective": "grpo", "form": "advantage"}, "form='advantage' applies to dgrpo, opd, not 'grpo'"),
    ({"form": "advantage", "kl_estimator": "full"}, "kl_estimator='full' is unused"),
    ({"objective": "grpo", "ref_kl_coef": 0.1}, "ref_kl_coef adds a KL term to the reference, which applies to dgrpo; 'grpo' has none"),
    ({"ref_kl_estimator": "full"}, "unknown ref_kl_estimator 'full'"),
    # as a loss k1 has zero expected gradient: only its advantage form is allowed
    ({"objective": "grpo", "kl_estimator": "k1"}, "kl_estimator='k1' as a loss has zero expected gradient"),
    ({"objective": "opd", "kl_estimator": "k1"}, "kl_estimator='k1' as a loss has zero expected gradient"),
    ({"ref_kl_coef": 0.1, "ref_kl_estimator": "k1"}, "ref_kl_estimator='k1' as a loss has zero expected"),
    ({"kl_coef": -0.1}, "kl_coef must be"),
    ({"kl_coef": float("nan")}, "kl_coef must be"),
    ({"eps_low": 1.0}, "eps_low must be < 1"),
    ({"eps_high": -0.1}, "eps_high must be"),
    ({"dual_clip": 1.0}, "dual_clip must be"),
    ({"tis_cap": 0.5}, "tis_cap must be"),
    ({"adv_eps": 0.0}, "adv_eps must be > 0"),
])
def test_bad_combinations_are_rejected_naming_the_option(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        LossConfig(**overrides).validate()
