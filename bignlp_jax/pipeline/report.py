"""The pipeline's closing report: report.md, loss_curves.png, and the same text on stdout.

It reads only files the stages wrote (metrics.jsonl of each run, evaluate/results.json,
pipeline.json), so it can be rebuilt at any time without touching a model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.evaluate.harness_results import score_table
from bignlp_jax.pipeline.spec import Pipeline
from bignlp_jax.pipeline.stages import read_lm_eval, read_results
from bignlp_jax.pipeline.state import freshness, read_state
from bignlp_jax.train.metrics import read_metrics

REPORT_FILE, PLOT_FILE = "report.md", "loss_curves.png"
LABELS = {"pretrain": "pretraining", "finetune": "finetuned from pretrained",
          "finetune_scratch": "finetuned from random init"}


def curve(run_dir: storage.AnyPath, key: str) -> list[tuple[int, float]]:
    """(step, value) of every training-log line of metrics.jsonl that has `key`. Lines from
    `bignlp-jax eval` (they carry `eval_seconds`) measure a different set and are left out."""
    return [(int(r["step"]), float(r[key])) for r in read_metrics(run_dir)
            if isinstance(r.get(key), (int, float)) and "eval_seconds" not in r]


def loss_summary(points: list[tuple[int, float]]) -> str:
    """'5.83 (step 1) -> 4.10 (25%) -> ... -> 2.95 (step 600), lowest 2.90'."""
    if not points:
        return "no loss logged"
    n = len(points)
    picks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    parts = [f"{points[i][1]:.3f} (step {points[i][0]})" for i in picks]
    return " -> ".join(parts) + f"; lowest {min(v for _, v in points):.3f}"


def plot(p: Pipeline, path: Path) -> Path | None:
    import matplotlib  # the `plot` extra; the report is written without it

    matplotlib.use("Agg")  # no display; the PNG is the output
    import matplotlib.pyplot as plt  # after use("Agg")

    panels: list[list[str]] = [[s for s in ("pretrain",) if s in p.stages()],
                              [s for s in ("finetune", "finetune_scratch") if s in p.stages()]]
    panels = [panel for panel in panels if panel]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, stages in zip(axes[0], panels):
        for stage, color in zip(stages, ("tab:blue", "tab:orange")):
            run = p.stage_dir(stage)
            for key, style, what in (("loss", "-", "train"), ("eval_loss", "o--", "validation")):
                points = curve(run, key)
                if points:
                    ax.plot(*zip(*points), style, color=color, markersize=3,
                            label=f"{LABELS[stage]}: {what}")
        pretraining = stages == ["pretrain"]
        ax.set_title("pretraining" if pretraining else "task finetuning")
        if not pretraining:
            ax.set_yscale("log")  # from-scratch starts ~20x higher; the gap matters at the end
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def build_report(p: Pipeline) -> str:
    stages = p.stages()
    log = read_state(p)
    state = log["stages"]
    # only outputs made from the current settings and inputs are reported: results of an
    # evaluation of older models, or curves of a superseded run, never sit beside new ones
    fresh = {s: freshness(p, s, log) for s in stages}
    results = (read_results(p) or {}) if fresh.get("evaluate") == "current" else {}
    lines = [f"# Pipeline report: {p.spec.name}", ""]
    stale = [s for s in stages if fresh[s] == "stale"]
    if stale:
        lines += [f"**Stale stages, left out below: {', '.join(stale)}** (made from other "
                  f"settings or inputs; run `bignlp-jax pipeline {p.path}` to redo them)", ""]

    if "pretrain" in stages and fresh["pretrain"] == "current":
        cfg = p.run_config("pretrain")
        lines += ["## Pretraining", "",
                  (f"- model: {cfg.model.name} ({cfg.model.num_layers} layers, hidden "
                   f"{cfg.model.hidden}), {cfg.train.steps} steps of "
                   f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens on "
                   f"{cfg.data.tfds_name}"),
                  f"- training loss: {loss_summary(curve(p.stage_dir('pretrain'), 'loss'))}"]
        val = results.get("pretrain")
        if val:
            lines.append(f"- validation loss {val['loss']:.3f}, perplexity "
                         f"**{val['perplexity']:.2f}** (step {val['step']})")
        lines.append("")

    tuned = {s: results[s] for s in ("finetune", "finetune_scratch") if s in results}
    if tuned:
        cfg = p.run_config("finetune")
        first = next(iter(tuned.values()))
        # task: null finetunes as a language model (on one dataset or a mixture)
        task = cfg.task.type if cfg.task is not None else "language_modelling"
        data = cfg.data.tfds_name or ", ".join(cfg.data.mixture or {})
        held_out = (f"{first['examples']} held-out examples" if "examples" in first
                    else f"{first.get('batches')} held-out batches")
        lines += ["## Task finetuning", "",
                  (f"Task: {data} ({task}), {cfg.train.steps} steps; "
                   f"evaluated on {held_out}."), ""]
        if task == "language_modelling":
            lines += ["| model | validation loss | perplexity |", "|---|---|---|"]
            for stage, r in tuned.items():
                lines.append(f"| {LABELS[stage]} | {r['loss']:.3f} | **{r['perplexity']:.2f}** |")
        elif task == "classification":
            lines += ["| model | accuracy | macro-F1 | target perplexity |", "|---|---|---|---|"]
            for stage, r in tuned.items():
                lines.append(f"| {LABELS[stage]} | **{_pct(r['accuracy'])}** | "
                             f"{r['macro_f1']:.3f} | {r['perplexity']:.2f} |")
            lines.append(f"| majority-class baseline (always '{first['majority_label']}') | "
                         f"{_pct(first['majority_baseline_accuracy'])} | | |")
        else:
            lines += ["| model | exact match | BLEU | target perplexity |", "|---|---|---|---|"]
            for stage, r in tuned.items():
                lines.append(f"| {LABELS[stage]} | {_pct(r.get('exact_match', 0.0))} | "
                             f"{r.get('bleu', 0.0):.2f} | {r['perplexity']:.2f} |")
        lines.append("")

    lines += lm_eval_section(p, fresh)

    lines += ["## Stages", "", "| stage | status | wall time | note |", "|---|---|---|---|"]
    for stage in stages:
        entry = state.get(stage, {})
        seconds = entry.get("seconds")
        status = "stale" if fresh[stage] == "stale" else entry.get("status", "not run")
        lines.append(f"| {stage} | {status} | "
                     f"{'' if seconds is None else f'{seconds:.0f} s'} | {entry.get('note', '')} |")
    total = sum(e.get("seconds", 0.0) for s, e in state.items() if s in stages)
    lines += [f"| total | | {total:.0f} s | |", ""]

    lines += ["## Outputs", "", f"- loss curves: {p.out / PLOT_FILE}"]
    for stage in stages:
        lines.append(f"- {stage}: {p.stage_dir(stage)}")
    if p.spec.export is not None and "export" not in stages:
        lines.append("- export: left out (bignlp_jax.hf.weights is not available in this install)")
    if p.spec.lm_eval is not None and "lm_eval" not in stages:
        lines.append("- lm_eval: left out (lm-eval is not installed: pip install -e '.[eval]')")
    return "\n".join(lines) + "\n"


def lm_eval_section(p: Pipeline, fresh: dict[str, str]) -> list[str]:
    """A table of the lm_eval stage's scores: one row per task and metric, one column per model
    (value ± the harness's stderr where it gives one)."""
    scores = read_lm_eval(p) if fresh.get("lm_eval") == "current" else None
    if not scores:
        return []
    models = [m for m in p.lm_eval_models() if m in scores]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for model in models:
        for task, metric, value, stderr in score_table(scores[model]):
            spread = f" ± {stderr:.4f}" if stderr is not None else ""
            cells.setdefault((task, metric), {})[model] = f"{value:.4f}{spread}"
    limit = p.spec.lm_eval.limit if p.spec.lm_eval is not None else None
    lines = ["## Standard benchmarks (lm-evaluation-harness)", "",
             "Scored in process by `bignlp-jax lm-eval`"
             + (f", at most {limit:g} documents per task" if limit else "") + ".", "",
             "| task | metric | " + " | ".join(LABELS.get(m, m) for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    for (task, metric), row in cells.items():
        lines.append(f"| {task} | {metric} | " + " | ".join(row.get(m, "") for m in models)
                     + " |")
    return lines + [""]


def write_report(p: Pipeline) -> str:
    """Write report.md and the PNG into the pipeline's output dir; return the report text.
    (Into a bucket: the PNG is drawn into a local file and uploaded whole.)"""
    p.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="bignlp-report-"))
    try:
        if plot(p, staging / PLOT_FILE) is not None:
            storage.copy_file(staging / PLOT_FILE, p.out / PLOT_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    text = build_report(p)
    (p.out / REPORT_FILE).write_text(text, encoding="utf-8")
    return text

