"""Checkpoint save/restore time of the gpt3_126m train state: local disk vs the GCS emulator.

    python benchmarks/storage_save.py [--rounds 2] [--model gpt3_126m] [--s3]

For each target the state is saved `rounds` times (steps 1..rounds) through `RunCheckpointer`
(async, as training does): `blocked` is how long `save()` holds the training loop, `total` is
until the save is durable (`wait()`); then the newest step is restored onto the same shardings.
The GCS emulator is fake-gcs-server in memory (tests/storage_emulators.py), so its figures are
the cost of the object-store path (HTTP, TensorStore's gcs driver), not of a real network.
`--s3` adds moto's S3 server (in memory; s3:// through checkpoint/orbax_compat.py).
Prints one JSON line per target. Peak host memory (ru_maxrss) is printed once at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="gpt3_126m")
    parser.add_argument("--s3", action="store_true", help="also the S3 emulator (moto)")
    args = parser.parse_args()

    import storage_emulators  # the tests' emulator start-up

    gen = storage_emulators.gcs_server()
    next(gen)  # emulator up, env set
    s3 = storage_emulators.s3_server() if args.s3 else None
    if s3 is not None:
        next(s3)
    import jax

    from bignlp_jax.checkpoint.manager import RunCheckpointer, restore_state
    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.state import abstract_state

    cfg = load_config(f"models/{args.model}", ["data.source=synthetic", "mesh.data=-1",
                                                "train.global_batch_size=8", "checkpoint.keep=2"])
    trainer = Trainer.build(cfg)
    state = trainer.layout.fresh()
    jax.block_until_ready(state)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    target = abstract_state(cfg.model, trainer.tx, trainer.state_sh)
    local_root = tempfile.mkdtemp(prefix="bignlp-bench-")
    targets = {"local disk": f"{local_root}/run",
               "GCS emulator": storage_emulators.new_bucket("gs") + "/run"}
    if args.s3:
        targets["S3 emulator"] = storage_emulators.new_bucket("s3") + "/run"
    for name, run_dir in targets.items():
        checkpointer = RunCheckpointer(run_dir, cfg.checkpoint)
        blocked, total = [], []
        for step in range(1, args.rounds + 1):
            start = time.perf_counter()
            checkpointer.save(step, state, {"step": step}, {"step": step})
            blocked.append(time.perf_counter() - start)
            checkpointer.wait()
            total.append(time.perf_counter() - start)
        checkpointer.close()
        start = time.perf_counter()
        restored = restore_state(checkpointer.directory / str(args.rounds), target)
        jax.block_until_ready(restored)
        print(json.dumps({"target": name, "state_MiB": round(size / 2**20),
                          "blocked_s": [round(b, 3) for b in blocked],
                          "total_s": [round(t, 2) for t in total],
                          "restore_s": round(time.perf_counter() - start, 2)}), flush=True)
    print(json.dumps({"peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    shutil.rmtree(local_root)
    gen.close()
    if s3 is not None:
        s3.close()


if __name__ == "__main__":
    main()
