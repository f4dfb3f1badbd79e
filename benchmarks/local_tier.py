"""Save and restore of the gpt3_126m train state: the local fast tier vs the durable tier.

    python benchmarks/local_tier.py [--rounds 3] [--model gpt3_126m] [--local-dir /dev/shm] [--gcs]

The durable tier is `RunCheckpointer` on a run dir on local disk (and, with --gcs, in the GCS
emulator of tests/storage_emulators.py); the local tier is `LocalCheckpointer` under
--local-dir (RAM by default). Each round saves one step to every tier (async, as training
does: `blocked` is how long `save()` holds the loop, `total` until `wait()` returns), then
restores the newest step of every tier in turn, interleaved so the machine's load falls on all
alike: `verify` (the CRC-32C pass a resume makes first) and `restore` (the arrays, onto the
same shardings; the durable files are still in the page cache from the save), and for the
durable tier on local disk `cold_restore` after those files were dropped from the page cache.
The local tier's resume needs no separate verify pass: `verified_restore` is its restore with
the checksums summed from the bytes it loads (what a resume from it runs). Prints one JSON line
per tier, then the peak host memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _evict(step_dir: Path) -> None:
    """Drop one step's files from the page cache (flushed first, so the pages are clean): the
    next read comes from the disk, as on a node that did not write them (a shared file system
    after a requeue). Only these files: the other users of the machine keep their cache."""
    for path in step_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="gpt3_126m")
    parser.add_argument("--local-dir", default="/dev/shm")
    parser.add_argument("--gcs", action="store_true", help="also the GCS emulator (slower)")
    args = parser.parse_args()

    emulator = None
    if args.gcs:
        import storage_emulators  # the tests' emulator start-up

        emulator = storage_emulators.gcs_server()
        next(emulator)  # emulator up, env set
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bignlp_jax.checkpoint import integrity, local_tier
    from bignlp_jax.checkpoint.manager import RunCheckpointer, restore_state
    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import Trainer

    local_root = tempfile.mkdtemp(prefix="bignlp-bench-", dir=args.local_dir)
    disk_root = tempfile.mkdtemp(prefix="bignlp-bench-")
    cfg = load_config(f"models/{args.model}", [
        "data.source=synthetic", "mesh.data=-1", "train.global_batch_size=8",
        "checkpoint.keep=2", f"checkpoint.local_dir={local_root}", "checkpoint.local_keep=2"])
    trainer = Trainer.build(cfg)
    # random values throughout: a trained state's numbers do not compress, while a fresh one's
    # AdamW moments are zeros that zstd shrinks to nothing (flattering the compressed tier)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: jax.device_put(rng.standard_normal(x.shape, np.float32).astype(x.dtype),
                                 x.sharding)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, trainer.layout.fresh())
    jax.block_until_ready(state)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    target = trainer.layout.abstract()

    run_dir = f"{disk_root}/run"
    tiers = {"durable, local disk": RunCheckpointer(run_dir, cfg.checkpoint)}
    if emulator is not None:
        tiers["durable, GCS emulator"] = RunCheckpointer(
            storage_emulators.new_bucket("gs") + "/run", cfg.checkpoint)
    tiers[f"local tier ({args.local_dir})"] = local_tier.LocalCheckpointer(
        run_dir, cfg.checkpoint, local_tier.layout_fingerprint(target))
    figures: dict[str, dict[str, list]] = {
        name: {"blocked_s": [], "total_s": [], "verify_s": [], "restore_s": []} for name in tiers}
    figures["durable, local disk"]["cold_restore_s"] = []
    local_name = next(name for name in tiers if name.startswith("local"))
    figures[local_name]["verified_restore_s"] = []
    for step in range(1, args.rounds + 1):
        for name, tier in tiers.items():
            start = time.perf_counter()
            tier.save(step, state, {"step": step}, {"step": step})
            figures[name]["blocked_s"].append(round(time.perf_counter() - start, 3))
            tier.wait()
            figures[name]["total_s"].append(round(time.perf_counter() - start, 2))
        for name, tier in tiers.items():
            step_dir = tier.directory / str(step)
            restore = (local_tier.restore_state if name.startswith("local")
                       else restore_state)
            if "cold_restore_s" in figures[name]:  # the same files, read again from the disk itself
                _evict(Path(str(step_dir)))
                start = time.perf_counter()
                restored = restore(step_dir, target)
                jax.block_until_ready(restored)
                figures[name]["cold_restore_s"].append(round(time.perf_counter() - start, 2))
                del restored
            start = time.perf_counter()
            assert integrity.verify(step_dir) is None
            verified = time.perf_counter()
            restored = restore(step_dir, target)
            jax.block_until_ready(restored)
            figures[name]["verify_s"].append(round(verified - start, 2))
            figures[name]["restore_s"].append(round(time.perf_counter() - verified, 2))
            del restored
            if name == local_name:  # what its resume runs: checksums summed as the bytes load
                start = time.perf_counter()
                restored = local_tier.restore_state(step_dir, target, verify=True)
                jax.block_until_ready(restored)
                figures[name]["verified_restore_s"].append(round(time.perf_counter() - start, 2))
                del restored
    for name, tier in tiers.items():
        tier.close()
        print(json.dumps({"tier": name, "state_MiB": round(size / 2**20), **figures[name]}),
              flush=True)
    print(json.dumps({"peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    shutil.rmtree(local_root)
    shutil.rmtree(disk_root)
    if emulator is not None:
        emulator.close()


if __name__ == "__main__":
    main()
