"""Where training figures go: `metrics.jsonl`, TensorBoard event files, and a progress bar.

Only process 0 writes; other processes get a logger that does nothing, so call sites need no
`if process_index() == 0`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from bignlp_jax import outage, storage
from bignlp_jax.rundir import RunDir

PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "eval_loss")
# A bucket run dir is also flushed at a log step once this long has passed since the last flush,
# so a run with rare checkpoints still shows its progress.
REMOTE_FLUSH_SECONDS = 60.0


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0,
                 enabled: bool | None = None, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = RunDir(run_dir).metrics_file
        self._tb: Any = None
        self._bar: Any = None
        # A bucket object cannot be appended to: lines wait in memory and `flush` (called at
        # checkpoint time and at close) rewrites the object once with everything logged so far.
        # TensorBoard events are written to a local folder and copied up at the same moments.
        self._remote = storage.is_remote(run_dir)
        self._pending: list[str] = []
        self._written: str | None = None  # the object's content (read once, then kept)
        self._flushed_at = time.monotonic()
        # a bucket run's local TensorBoard folder and where `flush` copies it
        self._tb_local: Path | None = None
        self._tb_remote: storage.AnyPath | None = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow

        tb_dir = RunDir(run_dir).tensorboard
        if self._remote:
            self._tb_local, self._tb_remote = storage.scratch_dir("bignlp-tb-"), tb_dir
            tb_dir = self._tb_local
        self._tb = SummaryWriter(str(tb_dir))
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Append one JSON line {step, time, **scalars} and mirror it to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in scalars.items()})
        if self._remote:
            self._pending.append(json.dumps(record) + "\n")
            if time.monotonic() - self._flushed_at > REMOTE_FLUSH_SECONDS:
                self.flush()
        else:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))
        if self._bar is not None:
            self._bar.n = int(step)
            shown = {k: shown_value(record[k]) for k in PROGRESS_KEYS if k in record}
            self._bar.set_postfix(shown, refresh=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (tqdm.write if self._bar is not None else print)(text)

    def flush(self) -> None:
        """Make everything logged so far durable (a no-op for a local run dir, which appends
        each line as it comes)."""
        if not (self.enabled and self._remote):
            return
        with outage.bounded("writing metrics.jsonl", self.path):
            self._flush()

    def _flush(self) -> None:
        self._tb.flush()
        if self._pending:
            if self._written is None:  # a resumed run: what earlier runs logged
                self._written = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self._written += "".join(self._pending)
            self.path.write_text(self._written, encoding="utf-8")
            self._pending.clear()
        self._flushed_at = time.monotonic()
        # both set for every enabled bucket run (__init__)
        assert self._tb_local is not None and self._tb_remote is not None
        for event_file in self._tb_local.iterdir():
            storage.copy_file(event_file, self._tb_remote / event_file.name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self.flush()
            if self._tb_local is not None:
                storage.rmtree(self._tb_local)
        if self._bar is not None:
            self._bar.close()


def shown_value(value) -> str:
    """A metric for people: 4 significant digits; NaN/inf (stored as strings) as they are."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _plain(value):
    """JSON-friendly number (NaN/inf become strings so the file stays valid JSON)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    if math.isfinite(value):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    return str(value)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).metrics_file
    if not path.exists():
        return []
    return [{k: _number(v) for k, v in json.loads(line).items()}
            for line in path.read_text(encoding="utf-8").splitlines() if line]


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _number(value):
    """Undo `_plain` for NaN/inf: readers (reports, progress) get floats they can format."""
    return NON_FINITE[value] if isinstance(value, str) and value in NON_FINITE else value
