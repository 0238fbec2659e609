"""The training objectives (sft, kd, grpo, opd, dgrpo) as per-token compositions.

Each objective maps the student's per-token terms (:class:`StudentTerms`) and the batch's
signals (:class:`TokenBatch`) to a per-token loss; :func:`evaluate` weights it with the
batch's global aggregation weights and sums. Nothing here knows about ranks or logits:
``megatron_dgrpo.parallel`` computes the terms from (sharded, possibly chunked) logits.

Per token t (definitions in ``shared/reference/method.md``):

==========  ==============================================================================
sft         ``-log pi(y_t)``
kd          ``KL(teacher || student)`` full vocabulary or teacher top-k (+ tail)
grpo        ``-IS_t * surrogate_t(A) + kl_coef * KL_est(student || reference)``
opd         loss form: ``KL_est(student || teacher)``; advantage form:
            ``-IS_t * surrogate_t(A')`` with ``A'_t = -(log pi_old - log pi_teacher)``
dgrpo       loss form: ``-IS_t * surrogate_t(A) + kl_coef * KL_est(student || teacher)``;
            advantage form: ``A'_t = A_t - kl_coef * (log pi_old - log pi_teacher)``;
            either form adds ``ref_kl_coef * KL_est(student || reference)`` when > 0
==========  ==============================================================================

``IS_t`` is the truncated importance weight (1 without rollout log-probs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_dgrpo.algorithms.advantages import shape_token_advantages
from megatron_dgrpo.algorithms.aggregation import AGGREGATIONS
from megatron_dgrpo.algorithms.inputs import StudentTerms, TokenBatch
from megatron_dgrpo.algorithms.kl import (
    SAMPLED_ESTIMATORS,
    TOPK_TAILS,
    sampled_token_kl,
    topk_kl,
)
from megatron_dgrpo.algorithms.metrics import LossMetrics
from megatron_dgrpo.algorithms.policy import (
    clipped_surrogate,
    truncated_importance_weight,
)

KL_ESTIMATORS = SAMPLED_ESTIMATORS + ("full", "topk")
FORMS = ("loss", "advantage")


@dataclass
class LossConfig:
    """Which objective to optimise and its hyper-parameters.

    Attributes:
        objective: one of ``sft``, ``kd``, ``grpo``, ``opd``, ``dgrpo`` (default ``dgrpo``).
        aggregation: ``token_mean`` over the global batch (default), ``seq_mean`` or
            ``constant_length`` (Dr. GRPO); see
            :func:`megatron_dgrpo.algorithms.aggregation.token_weights`.
        kl_estimator: anchor KL estimator: ``k2``/``k3`` on the sampled token (``k1`` only
            with ``form='advantage'``: as a loss its expected gradient is 0), ``full``
            (exact, needs teacher logits) or ``topk`` (teacher top-k + tail); the gradient
            each gives is tabulated in :mod:`megatron_dgrpo.algorithms.kl`. ``None`` picks
            the objective's default: kd ``full``, grpo ``k2``, opd ``full``, dgrpo ``full``.
        kl_coef: beta, weight of the anchor KL (reference for grpo, teacher for dgrpo) and
            of the teacher shaping in dgrpo's advantage form. ``None`` (default) picks the
            objective's ``default_kl_coef``: grpo 0.04 (the GRPO reference-KL convention),
            dgrpo 0.5 (the paper's best teacher-KL weight as secondary sources report it,
            beta = 0 worst; our own sweep: ``dgrpo experiment --ablations beta``). opd's KL
            has unit weight.
        ref_kl_coef: dgrpo only: weight of an extra KL to the reference (default 0 = none).
        ref_kl_estimator: sampled estimator of that reference term (default ``k2``, the
            reverse-KL gradient; ``k3`` gives the forward KL's, ``k1`` is refused).
        form: ``loss`` (differentiate the KL; default) or ``advantage`` (teacher log-ratio
            as a per-token advantage), for opd and dgrpo.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio;
            defaults 0.2 / 0.28 (clip-higher, DAPO).
        dual_clip: ``c > 1`` bounds negative-advantage objectives at ``c * A``; default off.
        tis_cap: truncated importance-sampling cap on ``pi_old / pi_rollout`` (default 2.0;
            ``None`` disables). Applies only when rollout log-probs are given.
        topk_tail: top-k KL treatment of the remaining mass: ``bucket`` (default) or
            ``renormalize``.
        adv_scale_by_std: group advantages divide by the group std (default True; False is
            Dr. GRPO). Read by the caller of ``advantages.group_advantages``.
        adv_eps: epsilon of that division (default 1e-6).
        adv_std_unbiased: divide by the sample std (``G - 1``; verl, TRL) instead of the
            population std (``G``; default).
        length_norm: ``aggregation='constant_length'`` (Dr. GRPO): the constant ``L`` every
            sequence is normalised by (``None``: the trainer uses ``sampling.max_new_tokens``).
    """

    objective: str = "dgrpo"
    aggregation: str = "token_mean"
    kl_estimator: str | None = None
    kl_coef: float | None = None
    ref_kl_coef: float = 0.0
    ref_kl_estimator: str = "k2"
    form: str = "loss"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    tis_cap: float | None = 2.0
    topk_tail: str = "bucket"
    adv_scale_by_std: bool = True
    adv_eps: float = 1e-6
    adv_std_unbiased: bool = False
    length_norm: int | None = None

    def __post_init__(self) -> None:
        if self.kl_coef is None and self.objective in OBJECTIVES:
            self.kl_coef = OBJECTIVES[self.objective].default_kl_coef

    @property
    def spec(self) -> Objective:
        """The registry entry of :attr:`objective` (its traits)."""
        return get_objective(self.objective)

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen copy of the initial policy is read (a reference KL is on)."""
        return self.spec.needs_reference(self)

    def notices(self) -> list[str]:
        """Start-up notes on choices that do something other than their name suggests."""
        notes = []
        for option, estimator, active in (
                ("kl_estimator", self.resolved_kl_estimator,
                 self.form == "loss" and self.spec.kl_estimators),
                ("ref_kl_estimator", self.ref_kl_estimator, self.ref_kl_coef > 0)):
            if estimator == "k3" and active:
                notes.append(f"loss.{option}=k3 follows the verl / DeepSeek-R1 convention: its "
                             "value estimates KL(policy || anchor), but its gradient is that of "
                             "the forward KL(anchor || policy); k2 gives the reverse KL's")
        return notes

    @property
    def resolved_kl_estimator(self) -> str:
        """The KL estimator in effect (the objective's default when unset)."""
        return self.kl_estimator or get_objective(self.objective).default_kl_estimator

    def validate(self) -> LossConfig:
        """Raise ValueError naming the offending option; return self for chaining."""
        spec = get_objective(self.objective)
        _require_choice("aggregation", self.aggregation, AGGREGATIONS)
        _require_choice("form", self.form, FORMS)
        _require_choice("topk_tail", self.topk_tail, TOPK_TAILS)
        _require_choice("ref_kl_estimator", self.ref_kl_estimator, SAMPLED_ESTIMATORS)
        if self.kl_estimator is not None:
            if not spec.kl_estimators:
                raise ValueError(f"objective {self.objective!r} has no KL term; kl_estimator must be None")
            _require_choice("kl_estimator", self.kl_estimator, spec.kl_estimators)
        if self.form not in spec.forms:
            accepting = sorted(n for n, o in OBJECTIVES.items() if self.form in o.forms)
            raise ValueError(f"form={self.form!r} applies to {', '.join(accepting)}, not "
                             f"{self.objective!r}")
        if self.form == "advantage":
            if self.kl_estimator not in (None, "k1"):
                raise ValueError("form='advantage' shapes advantages with the per-token "
                                 f"log-ratio (k1); kl_estimator={self.kl_estimator!r} is unused")
        if self.form == "loss":
            for option, estimator, active in (
                    ("kl_estimator", self.resolved_kl_estimator, spec.kl_estimators),
                    ("ref_kl_estimator", self.ref_kl_estimator, self.ref_kl_coef > 0)):
                if estimator == "k1" and active:
                    raise ValueError(
                        f"{option}='k1' as a loss has zero expected gradient (E_p[grad log p] "
                        f"= 0), so the KL term would train nothing; use 'k2' (the gradient of "
                        f"the reverse KL), 'full' where teacher logits exist, or k1 as a "
                        f"per-token advantage (form='advantage')")
        if self.ref_kl_coef and not spec.accepts_ref_kl:
            accepting = sorted(n for n, o in OBJECTIVES.items() if o.accepts_ref_kl)
            raise ValueError(f"ref_kl_coef adds a KL term to the reference, which applies to "
                             f"{', '.join(accepting)}; {self.objective!r} has none")
        for name in ("kl_coef", "ref_kl_coef", "adv_eps", "eps_low", "eps_high"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1 (the lower clip bound 1 - eps_low must stay "
                             f"positive), got {self.eps_low}")
        if self.adv_eps == 0:
            raise ValueError("adv_eps must be > 0")
        if self.length_norm is not None and (self.length_norm < 1
                                             or self.aggregation != "constant_length"):
            raise ValueError(f"length_norm (got {self.length_norm}) must be >= 1 and applies to "
                             f"aggregation='constant_length' only")
        if self.dual_clip is not None and not (self.dual_clip > 1 and math.isfinite(self.dual_clip)):
            raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {self.dual_clip}")
        if self.tis_cap is not None and not (self.tis_cap >= 1 and math.isfinite(self.tis_cap)):
            raise ValueError(f"tis_cap must be a finite number >= 1 (or None), got {self.tis_cap}")
        return self


@dataclass
class TokenLoss:
    """An objective's output before aggregation: ``loss`` ``[N]`` and per-token metric
    values: ``means`` (averaged with the loss weights) and ``extremes`` (min/max)."""

    loss: Tensor
    means: dict[str, Tensor]
    extremes: dict[str, Tensor]


@dataclass(frozen=True)
class Objective:
    """A registry entry: the objective's loss and every trait the trainer and the config
    validation read (no other module keeps lists of objective names).

    Attributes:
        name: the ``loss.objective`` value.
        loss_fn: ``loss_fn(config, terms, batch) -> TokenLoss``.
        teacher_kl_direction: direction of the full-vocabulary teacher KL it reads
            (``reverse`` = KL(student || teacher), ``forward`` = KL(teacher || student)).
        kl_estimators: the ``kl_estimator`` values it accepts; ``default_kl_estimator``: its
            default (``None``: no KL term).
        on_policy: trains on the student's own rollouts (else on fixed sequences: prompt +
            target answer).
        uses_rewards: needs outcome rewards (group advantages), hence ``min_group_size``
            responses per prompt.
        needs_teacher: reads the teacher (logits, top-k or target log-probs).
        kl_coef_anchor: what ``kl_coef`` weighs: ``reference``, ``teacher`` or ``None``
            (``kl_coef`` has no effect).
        accepts_ref_kl: ``ref_kl_coef`` adds a KL to the frozen reference on top.
        default_kl_coef: ``kl_coef`` when a config leaves it unset.
        forms: the ``form`` values it accepts (``loss``, ``advantage``).
        min_group_size: the fewest responses per prompt (``sampling.n``) it can train on.
    """

    name: str
    loss_fn: Callable[[LossConfig, StudentTerms, TokenBatch], TokenLoss]
    teacher_kl_direction: str
    kl_estimators: tuple[str, ...]
    default_kl_estimator: str | None
    on_policy: bool
    uses_rewards: bool
    needs_teacher: bool
    kl_coef_anchor: str | None = None
    accepts_ref_kl: bool = False
    default_kl_coef: float = 0.0
    forms: tuple[str, ...] = ("loss",)
    min_group_size: int = 1

    def needs_reference(self, config: LossConfig) -> bool:
        """Whether ``config`` turns on a KL term to the frozen initial policy."""
        return ((self.kl_coef_anchor == "reference" and config.kl_coef > 0)
                or (self.accepts_ref_kl and config.ref_kl_coef > 0))


def evaluate(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> tuple[Tensor, LossMetrics]:
    """Aggregated loss (scalar, this piece's share of the global loss) and its metrics.

    ``terms`` and ``batch`` are flattened to ``[N]`` tokens. Masked tokens contribute
    exactly 0 to the loss and its gradient, whatever values they hold.
    """
    loss_mask = batch.loss_mask
    token_loss = get_objective(config.objective).loss_fn(config, terms, _neutralise_masked(terms, batch))
    if batch.rollout_logp is not None:  # trainer vs engine on the sampled tokens (nats)
        sampler_logp = batch.old_logp if batch.old_logp is not None else terms.logp
        token_loss.extremes["rollout_logp_gap"] = (sampler_logp.detach() - batch.rollout_logp).abs()
    weighted = torch.where(loss_mask, batch.weights * token_loss.loss, 0.0)
    metrics = LossMetrics.from_tokens(loss_mask, batch.weights, token_loss.means, token_loss.extremes)
    return weighted.sum(), metrics


def _neutralise_masked(terms: StudentTerms, batch: TokenBatch) -> TokenBatch:
    """On masked tokens, set every log-prob signal to the student's own log-prob and the
    advantages to 0, so no inf/NaN can arise there (and leak into gradients via 0 * inf)."""
    mask, own = batch.loss_mask, terms.logp.detach()
    same = {name: None if getattr(batch, name) is None
            else torch.where(mask, getattr(batch, name), own)
            for name in ("old_logp", "rollout_logp", "ref_logp", "teacher_logp")}
    advantages = None if batch.advantages is None else torch.where(mask, batch.advantages, 0.0)
    topk_logp = batch.teacher_topk_logp
    if topk_logp is not None and terms.topk_logp is not None:
        topk_logp = torch.where(mask[:, None], topk_logp, terms.topk_logp.detach())
    return TokenBatch(loss_mask=mask, weights=batch.weights, targets=batch.targets,
                      advantages=advantages, teacher_topk_indices=batch.teacher_topk_indices,
                      teacher_topk_logp=topk_logp, **same)


def _require(value, name: str, objective: str):
    if value is None:
        raise ValueError(f"objective {objective!r} needs {name}, which was not given")
    return value


def _teacher_logp(terms: StudentTerms, batch: TokenBatch, objective: str) -> Tensor:
    """Teacher log-prob of the target: from teacher logits if given, else the batch's."""
    if terms.teacher_logp is not None:
        return terms.teacher_logp
    return _require(batch.teacher_logp, "teacher logits or batch.teacher_logp", objective)


def _teacher_kl(config: LossConfig, terms: StudentTerms, batch: TokenBatch, estimator: str,
                direction: str) -> Tensor:
    """Per-token KL between student and teacher with the chosen estimator."""
    objective = config.objective
    if estimator == "full":
        return _require(terms.teacher_kl, "teacher logits (kl_estimator='full')", objective)
    if estimator == "topk":
        student = _require(terms.topk_logp, "batch.teacher_topk_indices (kl_estimator='topk')",
                           objective)
        teacher = batch.teacher_topk_logp
        pair = (student, teacher) if direction == "reverse" else (teacher, student)
        return topk_kl(*pair, tail=config.topk_tail)
    return sampled_token_kl(terms.logp, _teacher_logp(terms, batch, objective), estimator)


def _teacher_kl_metric(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> dict[str, Tensor]:
    """Reverse KL to the teacher for monitoring: exact when teacher logits are given."""
    if terms.teacher_kl is not None:
        return {"kl_teacher": terms.teacher_kl}
    if terms.teacher_logp is not None or batch.teacher_logp is not None:
        return {"kl_teacher": sampled_token_kl(terms.logp, _teacher_logp(terms, batch, ""), "k3")}
    return {}


def _policy_gradient(config: LossConfig, terms: StudentTerms, batch: TokenBatch,
                     advantages: Tensor) -> TokenLoss:
    """``-IS_t * surrogate_t``, with clip, ratio, importance and advantage metrics."""
    old_logp = batch.old_logp if batch.old_logp is not None else terms.logp.detach()
    surrogate = clipped_surrogate(terms.logp, old_logp, advantages, config.eps_low,
                                  config.eps_high, config.dual_clip)
    loss = -surrogate.objective
    means = {
        "clip_frac_low": surrogate.clipped_low.to(loss.dtype),
        "clip_frac_high": surrogate.clipped_high.to(loss.dtype),
        "clip_frac_dual": surrogate.dual_clipped.to(loss.dtype),
        "ratio_mean": surrogate.ratio,
        "adv_mean": advantages.detach(),
    }
    extremes = {"ratio": surrogate.ratio, "adv": advantages.detach()}
    if batch.rollout_logp is not None:
        importance = truncated_importance_weight(old_logp, batch.rollout_logp, config.tis_cap)
        loss = loss * importance.weight
        means["is_ratio_mean"] = importance.ratio
        means["is_capped_frac"] = importance.capped.to(loss.dtype)
        extremes["is_ratio"] = importance.ratio
    return TokenLoss(loss, means, extremes)


def _with_reference_kl(config: LossConfig, terms: StudentTerms, batch: TokenBatch,
                       token_loss: TokenLoss, coef: float, estimator: str) -> TokenLoss:
    """Add ``coef * KL_est(student || reference)`` (and always its metric when possible)."""
    if coef > 0:
        ref_logp = _require(batch.ref_logp, "batch.ref_logp (a reference KL term is on)",
                            config.objective)
        kl = sampled_token_kl(terms.logp, ref_logp, estimator)
        token_loss.loss = token_loss.loss + coef * kl
        token_loss.means["kl_ref"] = kl
    elif batch.ref_logp is not None:
        token_loss.means["kl_ref"] = sampled_token_kl(terms.logp, batch.ref_logp, "k3")
    return token_loss


def _sft(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> TokenLoss:
    return TokenLoss(-terms.logp, {"nll": -terms.logp, "entropy": terms.entropy}, {})


def _kd(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> TokenLoss:
    kl = _teacher_kl(config, terms, batch, config.resolved_kl_estimator, "forward")
    return TokenLoss(kl, {"kl_teacher_forward": kl, "nll": -terms.logp, "entropy": terms.entropy}, {})


def _grpo(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> TokenLoss:
    advantages = _require(batch.advantages, "batch.advantages", config.objective)
    token_loss = _policy_gradient(config, terms, batch, advantages)
    token_loss.means["entropy"] = terms.entropy
    token_loss.means.update(_teacher_kl_metric(config, terms, batch))
    return _with_reference_kl(config, terms, batch, token_loss, config.kl_coef,
                              config.resolved_kl_estimator)


def _teacher_shaped_advantages(config: LossConfig, terms: StudentTerms, batch: TokenBatch,
                               base: Tensor, coef: float) -> Tensor:
    sampler_logp = batch.old_logp if batch.old_logp is not None else terms.logp
    return shape_token_advantages(base, sampler_logp, _teacher_logp(terms, batch, config.objective), coef)


def _opd(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> TokenLoss:
    if config.form == "advantage":
        advantages = _teacher_shaped_advantages(config, terms, batch, torch.zeros_like(terms.logp), 1.0)
        token_loss = _policy_gradient(config, terms, batch, advantages)
        token_loss.means.update(_teacher_kl_metric(config, terms, batch))
    else:
        kl = _teacher_kl(config, terms, batch, config.resolved_kl_estimator, "reverse")
        token_loss = TokenLoss(kl, {"kl_teacher": kl}, {})
    token_loss.means["entropy"] = terms.entropy
    return _with_reference_kl(config, terms, batch, token_loss, 0.0, config.ref_kl_estimator)


def _dgrpo(config: LossConfig, terms: StudentTerms, batch: TokenBatch) -> TokenLoss:
    advantages = _require(batch.advantages, "batch.advantages", config.objective)
    if config.form == "advantage":
        shaped = _teacher_shaped_advantages(config, terms, batch, advantages, config.kl_coef)
        token_loss = _policy_gradient(config, terms, batch, shaped)
        token_loss.means.update(_teacher_kl_metric(config, terms, batch))
    else:
        token_loss = _policy_gradient(config, terms, batch, advantages)
        kl = _teacher_kl(config, terms, batch, config.resolved_kl_estimator, "reverse")
        token_loss.loss = token_loss.loss + config.kl_coef * kl
        token_loss.means["kl_teacher"] = kl
    token_loss.means["entropy"] = terms.entropy
    return _with_reference_kl(config, terms, batch, token_loss, config.ref_kl_coef,
                              config.ref_kl_estimator)


OBJECTIVES: dict[str, Objective] = {
    spec.name: spec for spec in (
        Objective("sft", _sft, "reverse", (), None, on_policy=False, uses_rewards=False,
                  needs_teacher=False),
        Objective("kd", _kd, "forward", ("full", "topk"), "full", on_policy=False,
                  uses_rewards=False, needs_teacher=True),
        Objective("grpo", _grpo, "reverse", SAMPLED_ESTIMATORS, "k2", on_policy=True,
                  uses_rewards=True, needs_teacher=False, kl_coef_anchor="reference",
                  default_kl_coef=0.04,
                  min_group_size=2),
        Objective("opd", _opd, "reverse", KL_ESTIMATORS, "full", on_policy=True,
                  uses_rewards=False, needs_teacher=True, forms=FORMS),
        Objective("dgrpo", _dgrpo, "reverse", KL_ESTIMATORS, "full", on_policy=True,
                  uses_rewards=True, needs_teacher=True, kl_coef_anchor="teacher",
                  default_kl_coef=0.5,
                  accepts_ref_kl=True, forms=FORMS, min_group_size=2),
    )
}


def get_objective(name: str) -> Objective:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _require_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; choose one of {tuple(choices)}")
