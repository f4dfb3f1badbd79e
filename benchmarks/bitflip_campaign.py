"""Single-bit flips at random offsets in every file of a checkpoint step: does a resume notice?

    PYTHONPATH=. python benchmarks/bitflip_campaign.py [--trials 60] [--seed 0]

Trains the tiny model 4 steps (checkpoints at steps 2 and 4), then the uninterrupted
reference: resumed from step 4 to step 6. Each trial copies the run, flips one random bit at a
random offset of one file of `checkpoints/4/` (the first trials take every file once, the rest
are drawn at random), and resumes to step 6 again, in this process (`train`, as the CLI runs
it). Outcomes:

- detected: refused with a UserError (exit 2) that names step 4, the damaged file and the fix
  `checkpoint.resume_from=2`;
- harmless: trained, and steps 5-6 (losses, gradient norms, final params) are bitwise those of
  the reference: the flipped byte is never read (commit markers, Orbax's step metadata);
- silent: trained to a different result, or refused without naming the file (counted apart);
- crash: any other exception (a bug).

Prints one line per trial and the counts per outcome and per kind of file.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from bignlp_jax.config import load_config
from bignlp_jax.errors import UserError
from bignlp_jax.train.loop import train
from bignlp_jax.train.metrics import read_metrics

OVERRIDES = [
    "model.vocab_size=256", "data.source=synthetic", "data.seq_len=32",
    "train.global_batch_size=8", "train.eval_every=0", "train.log_every=1",
    "optimizer.schedule=cosine", "optimizer.decay_steps=6", "optimizer.warmup_steps=1",
    "checkpoint.every_steps=2", "checkpoint.keep=10", "mesh.data=-1",
]
STEP, EARLIER, END = 4, 2, 6


def config(run: Path, steps: int):
    return load_config("tiny", [*OVERRIDES, f"run.dir={run}", f"train.steps={steps}"])


def outcome(run: Path) -> tuple[list, list]:
    """(metrics of steps after STEP, final params) of a finished run."""
    from bignlp_jax.checkpoint import load_params

    records = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run)
               if r["step"] > STEP]
    params = jax.tree.leaves(jax.tree.map(np.asarray, load_params(run, config(run, END).model)))
    return records, params


def kind(name: str) -> str:
    """A file's kind: its path with hashes and numbers folded."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] == "d":
        parts[-1] = "<hash>"
    parts = [p.replace("process_0", "process_<i>") for p in parts]
    return "/".join(parts)


def flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    root = Path(tempfile.mkdtemp(prefix="bitflip_"))
    # every trial builds the same programs: compile them once (a cache inside the scratch dir)
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        base = root / "base"
        train(config(base, STEP))
        ref_run = root / "reference"
        shutil.copytree(base, ref_run)
        train(config(ref_run, END))
        reference = outcome(ref_run)
        step_dir = base / "checkpoints" / str(STEP)
        files = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                       if p.is_file())
        order = files + [rng.choice(files) for _ in range(max(0, opts.trials - len(files)))]
        counts: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for n, name in enumerate(order[:max(opts.trials, len(files))]):
            run = root / f"t{n}"
            shutil.copytree(base, run)
            target = run / "checkpoints" / str(STEP) / name
            size = target.stat().st_size
            offset, bit = rng.randrange(size), rng.randrange(8)
            flip(target, offset, bit)
            try:
                train(config(run, END))
                result = "harmless" if _same(outcome(run), reference) else "silent"
                note = ""
            except UserError as e:
                text = str(e)
                named = (f"step {STEP}" in text and Path(name).name in text
                         and f"checkpoint.resume_from={EARLIER}" in text)
                result = "detected" if named else "silent"
                note = text.splitlines()[1].strip()[:110] if "\n" in text else text[:110]
            except Exception as e:  # a bug: counted, never hidden
                result, note = "crash", f"{type(e).__name__}: {str(e)[:100]}"
            counts[result] += 1
            by_kind[kind(name)][result] += 1
            print(f"trial {n:3d} {result:9s} {name} byte {offset}/{size} bit {bit}  {note}",
                  flush=True)
            shutil.rmtree(run, ignore_errors=True)
        print(f"\n{sum(counts.values())} flips in {len(files)} files of one step: "
              + ", ".join(f"{k} {counts[k]}" for k in ("detected", "harmless", "silent",
                                                       "crash")))
        for k, c in sorted(by_kind.items()):
            print(f"  {k:45s} " + ", ".join(f"{r} {c[r]}" for r in sorted(c)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _same(got: tuple[list, list], want: tuple[list, list]) -> bool:
    return got[0] == want[0] and len(got[1]) == len(want[1]) and all(
        np.array_equal(a, b) for a, b in zip(got[1], want[1], strict=True))


if __name__ == "__main__":
    main()
