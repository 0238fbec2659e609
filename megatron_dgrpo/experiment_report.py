"""The report of ``dgrpo experiment``: tables of mean +- std over seeds, learning curves, and a
plain statement of whether the paper's ordering held (``report.md``, ``*.png``)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from megatron_dgrpo.data.evaluate import depth_sort_key

SETS = ("long", "longer", "short")
MAIN_ORDER = ("student_base", "sft_reference", "sft", "kd", "grpo", "opd", "dgrpo")
# The paper's claim: dGRPO above every baseline on long-context tasks.
BASELINES = ("sft", "kd", "grpo", "opd")
CURVES = (("reward/mean", "training reward (rollouts)"),
          ("reward/std", "reward std within the step (stability)"),
          ("policy/kl_teacher", "reverse KL to the teacher (nats)"),
          ("policy/entropy", "entropy (nats)"),
          ("response/length_mean", "response length (tokens)"))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


def score_table(table: dict, methods: list[str], baseline: dict[str, float],
                teacher: dict[str, float]) -> list[str]:
    """Markdown rows: methods x held-out sets, mean ± std over seeds."""
    lines = ["| method | " + " | ".join(SETS) + " |", "|---|" + "---:|" * len(SETS)]
    lines.append("| no-context baseline | " + " | ".join(f"{baseline[s]:.1f}" for s in SETS) + " |")
    lines.append("| teacher | " + " | ".join(f"{teacher[s]:.1f}" for s in SETS) + " |")
    for method in methods:
        if method in table:
            lines.append(f"| {method} | " + " | ".join(_cell(table[method].get(s, {}).get("all"))
                                                      for s in SETS) + " |")
    return lines


def family_table(table: dict, methods: list[str], set_name: str,
                 baseline: dict[str, float]) -> list[str]:
    """Markdown rows: methods x task families on one held-out set."""
    families = sorted({f for m in methods if m in table
                       for f in table[m].get(set_name, {}) if f != "all"})
    lines = ["| method | " + " | ".join(families) + " |", "|---|" + "---:|" * len(families)]
    lines.append("| no-context baseline | " + " | ".join(
        f"{baseline.get(f, float('nan')):.1f}" for f in families) + " |")
    for method in methods:
        if method in table:
            lines.append(f"| {method} | " + " | ".join(_cell(table[method][set_name].get(f))
                                                      for f in families) + " |")
    return lines


def ordering_verdict(table: dict, set_name: str) -> list[str]:
    """Sentences on dGRPO against each baseline on ``set_name``: the difference of means
    and whether it exceeds the seeds' spread (two standard errors of the difference)."""
    if "dgrpo" not in table or not any(m in table for m in BASELINES):
        return []
    dgrpo = table["dgrpo"][set_name]["all"]
    lines, above = [], []
    for method in BASELINES:
        if method not in table:
            continue
        other = table[method][set_name]["all"]
        difference = statistics.fmean(dgrpo) - statistics.fmean(other)
        spread = 2 * math.sqrt(sum(mean_std(v)[1] ** 2 / len(v) for v in (dgrpo, other)))
        verdict = ("above" if difference > spread else "below" if difference < -spread
                   else "not distinguishable from")
        if verdict == "above":
            above.append(method)
        lines.append(f"dGRPO is {verdict} {method} on `{set_name}`: {difference:+.1f} points "
                     f"(two standard errors of the difference over seeds: {spread:.1f}).")
    held = len(above) == len([m for m in BASELINES if m in table])
    lines.append(f"**The paper's ordering (dGRPO above SFT, KD, GRPO and OPD) "
                 f"{'held' if held else 'did not hold'} on `{set_name}`**"
                 + ("." if held else f" (above: {', '.join(above) or 'none'})."))
    return lines


def ranking_sentence(table: dict, variants: dict[str, float], name: str, claim: str) -> str:
    """``variants`` (method -> setting) ranked by mean score on ``long``, with the largest
    seed std among them, beside what the paper reports (``claim``)."""
    stats = {m: mean_std(table[m]["long"]["all"]) for m in variants if m in table}
    ranked = sorted(stats, key=lambda m: -stats[m][0])
    order = ", ".join(f"{variants[m]:g}: {stats[m][0]:.1f}" for m in ranked)
    spread = max(std for _, std in stats.values())
    return (f"{name} ranked by mean score on `long` (best first): {order}; the largest seed "
            f"std among them is {spread:.1f}. The paper reports {claim}.")


def _curves(run_dirs: dict[str, list[str]], out_png: Path) -> None:
    """Training curves per method (mean over seeds), one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_dgrpo.train.metrics import read_metrics

    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2),
                                layout="constrained")
    for method, dirs in sorted(run_dirs.items()):
        records = [read_metrics(d) for d in dirs]
        for axis, (key, title) in zip(axes, CURVES):
            series = [[r.get(key) for r in run] for run in records]
            if not series or any(v is None for run in series for v in run):
                continue
            steps = min(len(run) for run in series)
            mean = [statistics.fmean(run[i] for run in series) for i in range(steps)]
            axis.plot(range(1, steps + 1), mean, label=method)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("step")
    axes[0].legend(fontsize=7)
    figure.savefig(out_png, dpi=90)
    plt.close(figure)


def _heldout_curves(curves: dict[str, dict[str, list[float]]], methods: list[str],
                    baseline: float, teacher: float, out_png: Path) -> None:
    """Held-out score on ``long`` against the optimizer step, mean over seeds with a +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    for method in methods:
        if method not in curves:
            continue
        steps = sorted(curves[method], key=int)
        stats = [mean_std(curves[method][step]) for step in steps]
        x = [int(step) for step in steps]
        axis.plot(x, [m for m, _ in stats], marker="o", label=method)
        axis.fill_between(x, [m - d for m, d in stats], [m + d for m, d in stats], alpha=0.15)
    axis.axhline(teacher, color="black", linestyle="--", label="teacher")
    axis.axhline(baseline, color="tab:gray", linestyle=":", label="no-context baseline")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("held-out score x 100 on long (greedy)")
    axis.legend(fontsize=7)
    figure.savefig(out_png, dpi=90)
    plt.close(figure)


def depth_rows(depths: dict[str, dict[str, list[float]]], methods: list[str]) -> list[str]:
    """Markdown rows: methods x needle depth (fraction of the document), mean ± std."""
    present = [m for m in methods if m in depths]
    if not present:
        return []
    columns = sorted({d for m in present for d in depths[m]}, key=depth_sort_key)
    lines = ["| method | " + " | ".join(f"depth {d}" for d in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {m} | " + " | ".join(_cell(depths[m].get(d)) for d in columns) + " |"
              for m in present]
    return lines


def _bars(table: dict, methods: list[str], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in methods if m in table]
    figure, axis = plt.subplots(figsize=(1.2 * len(present) + 2, 3.4), layout="constrained")
    width = 0.8 / len(SETS)
    for index, set_name in enumerate(SETS):
        stats = [mean_std(table[m][set_name]["all"]) for m in present]
        axis.bar([i + index * width for i in range(len(present))], [s[0] for s in stats], width,
                 yerr=[s[1] for s in stats], capsize=3, label=set_name)
    axis.set_xticks([i + width for i in range(len(present))], present, rotation=20, fontsize=8)
    axis.set_ylabel("held-out score x 100 (greedy)")
    axis.legend(fontsize=8)
    figure.savefig(out_png, dpi=90)
    plt.close(figure)


def write_experiment_report(out: Path, summary: dict[str, Any]) -> str:
    """Write ``report.md``, ``scores.png`` and ``curves.png`` under ``out``; return the text."""
    table, scores = summary["table"], summary["scores"]
    baseline = {s: scores["teacher"][s]["baseline"]["all"] for s in SETS}
    teacher = {s: scores["teacher"][s]["all"] for s in SETS}
    main = [m for m in MAIN_ORDER if m in table]
    ablations = [m for m in table if m not in MAIN_ORDER]
    plan, seeds = summary["plan"], summary["seeds"]
    lines = ["# dgrpo experiment", "",
             f"Student: the shipped student base (`{summary['student_base']}`), teacher "
             f"`{summary['teacher']}`; seeds {', '.join(map(str, seeds))}; "
             f"{plan['method_steps']} optimizer steps per method, "
             f"{plan['prompts_per_step'] * plan['group_size']} sequences per step. Held-out "
             f"score (mean reward x 100, greedy, {plan['heldout_examples']} tasks per set; mean "
             f"± std over seeds): `long` = {plan['document_tokens']}-token documents (the "
             f"training length), `longer` = {2 * plan['document_tokens']}, `short` = "
             f"{plan['short_tokens']}. `student_base` is the model every method starts from.", "",
             *score_table(table, main, baseline, teacher), "",
             f"Per task family on `long` ({plan['document_tokens']} tokens):", "",
             *family_table(table, main, "long", scores["teacher"]["long"]["baseline"]), "",
             "By needle depth on `long` (all families):", "",
             *depth_rows(summary["depths"], main), ""]
    for set_name in ("long", "longer"):
        lines += ordering_verdict(table, set_name) + [""]
    if ablations:
        lines += ["Ablations (dGRPO variants; `dgrpo` is the main run):", "",
                  *score_table(table, ["dgrpo", *ablations], baseline, teacher), ""]
        beta = {"dgrpo": plan["dgrpo_kl_coef"]} | {m: float(m[len("dgrpo_beta"):])
                                                   for m in ablations if m.startswith("dgrpo_beta")}
        share = {"dgrpo": 1.0} | {m: float(m[len("dgrpo_long"):])
                                  for m in ablations if m.startswith("dgrpo_long")}
        for name, variants, claim in (("beta", beta, "0.5 best, 0 worst"),
                                      ("long share", share, "0.9 best")):
            if len(variants) > 1:
                lines += [ranking_sentence(table, variants, name, claim), ""]
    run_dirs: dict[str, list[str]] = {}
    for run in summary["runs"].values():
        run_dirs.setdefault(run["method"], []).append(run["run_dir"])
    _bars(table, main + ablations, out / "scores.png")
    _curves(run_dirs, out / "curves.png")
    _heldout_curves(summary["curves"], main + ablations, baseline["long"], teacher["long"],
                    out / "heldout_curves.png")
    lines += ["Figures: `scores.png` (held-out scores with the seed std), `heldout_curves.png` "
              "(held-out score on `long` through training, mean ± std over seeds), "
              "`curves.png` (training curves, mean over seeds). Per-run curves: "
              "`runs/<run>/report/`.", "",
              "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {value:.0f} |" for phase, value in summary["seconds"].items()]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
