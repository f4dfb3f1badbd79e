"""Cost of checkpoint checksums: save and restore with and without them, interleaved.

    PYTHONPATH=. python benchmarks/checkpoint_integrity.py [--rounds 5] [--large-mib 128]

Two states: the tiny model's TrainState-sized tree (~1.4 MB on disk) and one of `--large-mib`
MiB of float32 arrays (8 leaves). Each round saves once with the plain Orbax PyTree handler and
once with the checksumming one (synchronously, until durable), then restores each step once plainly
and once after `integrity.verify_step` (all files re-read). Files are in the page cache when read
back, so the restore figures are the CPU cost of hashing, not of the disk. Prints medians (s).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from bignlp_jax.checkpoint import integrity
from bignlp_jax.checkpoint.handlers import StateSave, saving_state_handler, state_handler
from bignlp_jax.checkpoint.manager import restore_state


def make_state(total_mib: float, leaves: int = 8) -> dict:
    n = max(1, int(total_mib * 2**20 / 4 / leaves))
    key = jax.random.key(0)
    return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (n,)) for i in range(leaves)}


def save(step_dir: Path, state: dict, checksums: bool) -> float:
    start = time.perf_counter()
    if checksums:
        with ocp.Checkpointer(saving_state_handler()) as ck:
            ck.save(step_dir / "state", args=StateSave(state))
    else:
        with ocp.Checkpointer(state_handler()) as ck:
            ck.save(step_dir / "state", args=ocp.args.PyTreeSave(state))
    return time.perf_counter() - start


def restore(step_dir: Path, target: dict, verify: bool) -> float:
    start = time.perf_counter()
    if verify:
        problem = integrity.verify_step(step_dir)
        assert problem is None, problem
    jax.block_until_ready(restore_state(step_dir, target))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large-mib", type=float, default=128)
    opts = parser.parse_args()
    for name, mib in (("small", 1.4), ("large", opts.large_mib)):
        state = make_state(mib)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), state)
        times: dict[str, list[float]] = {k: [] for k in ("save", "save+crc", "restore",
                                                          "verify+restore")}
        for r in range(opts.rounds + 1):  # round 0 warms up (compiles, page cache)
            root = Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
            try:
                t = {"save": save(root / "plain", state, False),
                     "save+crc": save(root / "crc", state, True)}
                t["restore"] = restore(root / "crc", target, False)
                t["verify+restore"] = restore(root / "crc", target, True)
            finally:
                shutil.rmtree(root)
            if r:
                for k, v in t.items():
                    times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} ({mib:g} MiB): " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
              + f"; save x{med['save+crc'] / med['save']:.2f}, restore "
              f"x{med['verify+restore'] / med['restore']:.2f}", flush=True)


if __name__ == "__main__":
    main()
