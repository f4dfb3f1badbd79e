"""One process of a data-only job: reads its rows of global batches [first, first + steps) of the
tiny preset's training stream (a sharded store in DATA_DIR), optionally resuming a saved data
state, and saves its rows and its state after each batch.

usage: store_reader_worker.py DATA_DIR PROCESS NUM_PROCESSES FIRST STEPS OUT.npz [STATE.json]
"""

import json
import sys

import numpy as np

from bignlp_jax.config import load_config
from bignlp_jax.data import make_source

data_dir, i, n, first, steps, out = sys.argv[1:7]
i, n, first, steps = int(i), int(n), int(first), int(steps)
cfg = load_config("tiny", [f"data.data_dir={data_dir}", "data.seq_len=32",
                           "train.global_batch_size=8"])
B = cfg.train.global_batch_size
source = make_source(cfg, "train", (i * B // n, (i + 1) * B // n))
if len(sys.argv) > 7:
    source.set_state(json.loads(open(sys.argv[7]).read()))
assert source.get_state()["step"] == first
batches, states = [], []
for _ in range(steps):
    batches.append(next(source))
    states.append(json.dumps(source.get_state()))
np.savez(out, tokens=np.stack([b["tokens"] for b in batches]),
         segments=np.stack([b["segment_ids"] for b in batches]), states=np.array(states))
