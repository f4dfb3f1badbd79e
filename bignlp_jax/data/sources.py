"""Config -> batch source: which source a run's config asks for (synthetic, token store, task).

Each source is built by the subpackage that owns it; this module only chooses, so that the
commands and the train loop ask one place.
"""

from __future__ import annotations

from bignlp_jax.config import Config
from bignlp_jax.data.batches import BatchSource
from bignlp_jax.data.corpora.synthetic import SyntheticSource


def make_source(cfg: Config, split: str, rows: tuple[int, int]) -> BatchSource:
    """The batch source the config asks for, reading only `rows` of each global batch."""
    if cfg.task is not None:  # finetuning: one task example per row (data/tasks/source.py)
        from bignlp_jax.data.tasks.source import make_task_source  # grain, tfds: when used

        return make_task_source(cfg, split, rows)
    if cfg.data.source == "synthetic":
        return SyntheticSource(seed=cfg.run.seed, vocab_size=cfg.model.vocab_size,
                               seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch_size,
                               rows=rows, split=split)
    if cfg.data.source == "tfds":
        from bignlp_jax.data.text_source import make_text_source  # grain, tfds: only when used

        return make_text_source(cfg, split, rows)
    raise NotImplementedError(f"data.source={cfg.data.source!r} is not available yet")


def make_eval_sources(cfg: Config, rows: tuple[int, int]) -> dict[str, BatchSource]:
    """{name: held-out stream}: one per dataset of a `data.mixture`, else {"": the stream}.

    Built once per run; every evaluation rewinds them (`set_state` of their initial state)."""
    if cfg.task is None and cfg.data.source == "tfds" and cfg.data.mixture:
        from bignlp_jax.data.text_source import make_eval_sources as per_dataset  # grain, tfds

        return dict(per_dataset(cfg, rows))
    return {"": make_source(cfg, "validation", rows)}


def record_run_data(cfg: Config, run_dir, locked: bool = True) -> None:
    """At the start of a run: check the tokenizer against the model (UserError giving both
    vocabulary sizes) and copy it into the run's tokenizer folder; `locked` (a run with
    trained state) refuses another tokenizer than the recorded one. Nothing to do for
    synthetic data."""
    if cfg.data.source == "tfds":
        from bignlp_jax.data.text_source import record_tokenizer  # grain, tfds: when used

        record_tokenizer(cfg, run_dir, locked)
