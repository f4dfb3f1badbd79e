"""The results of a harness run as files and tables (no lm_eval import: the pipeline's report
reads them without the eval extra installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jax

from bignlp_jax import storage


def code_commit() -> str | None:
    """The git commit of the bignlp_jax source that ran (None outside a git checkout)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run([git, "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _plain(value: Any) -> Any:
    """JSON for what the harness's results may hold besides plain types (numpy scalars, sets,
    callables in task configs), as the harness's own writer does."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set):
        return sorted(value, key=str)
    return str(value)


def results_json(results: dict[str, Any], run_dir: Path, step: int | None) -> str:
    """The harness's results JSON (its own keys) plus run_dir, step and commit."""
    out = {**results, "run_dir": str(run_dir), "step": step, "commit": code_commit()}
    return json.dumps(out, indent=2, default=_plain, ensure_ascii=False) + "\n"


def write_results(text: str, output: str | Path) -> Path:
    """Write the results file (process 0 only; the directory is created)."""
    path = storage.path(output)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def score_table(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) rows of a results dict, in the harness's task order."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows
