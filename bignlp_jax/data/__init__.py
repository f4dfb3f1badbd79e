"""Data: batch sources (synthetic, TFDS + Grain) and global batch assembly.

The names below are the package's public face (train/, perf/ and tests import them from here);
modules inside data/ import them from where they live, never from this file.
"""

from __future__ import annotations

from bignlp_jax.data.batches import BatchSource, global_batch, process_rows
from bignlp_jax.data.corpora.synthetic import SyntheticSource
from bignlp_jax.data.sources import make_eval_sources, make_source, record_run_data

__all__ = ["BatchSource", "SyntheticSource", "global_batch", "make_eval_sources", "make_source",
           "process_rows", "record_run_data"]
