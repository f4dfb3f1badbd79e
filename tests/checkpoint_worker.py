"""One process of the multi-process checkpoint test (tests/test_checkpoint_multiprocess.py).

    python checkpoint_worker.py PORT NUM_PROCESSES PROCESS_ID RUN_DIR DUMP [OVERRIDES...]

Joins a loopback jax.distributed job (gloo collectives; XLA_FLAGS gives 2 CPU devices per
process) and trains the pinned tiny config with the overrides. When training is preempted (the
test sends SIGTERM to one process), every process then restores the checkpoint just written (full
train state and data position, from disk, onto this job's sharded mesh, the way `train` resumes)
and process 0 writes the gathered params, the step and the data position to DUMP (.npz).
Exits with REQUEUE_EXIT_CODE after a preemption, 0 when training finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: str, num_processes: str, process_id: str, run_dir: str, dump: str,
         *overrides: str) -> int:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(num_processes), process_id=int(process_id))
    sys.path.insert(0, str(Path(__file__).parent))
    import json

    import numpy as np
    from checkpoint_common import config
    from jax.experimental import multihost_utils

    from bignlp_jax.data import make_source
    from bignlp_jax.errors import Preempted
    from bignlp_jax.train.loop import Trainer, train
    from bignlp_jax.train.start import start_state

    cfg = config(run_dir, *overrides)
    try:
        train(cfg)
        return 0
    except Preempted as e:
        print(f"process {process_id}: {e}", flush=True)
        exit_code = e.exit_code
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, run_dir)
    gathered = multihost_utils.process_allgather(start.state.params, tiled=True)
    if jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(gathered)[0]
        arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
        np.savez(dump, step=start.step, data=json.dumps(source.get_state()), **arrays)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
