"""Pipeline bubble, measured against (S-1)/(M+S-1), and the compiled program's collectives.

stage=4 x fsdp=2 on 8 simulated CPU devices, a Llama of 8 layers, microbatches of 2 rows for
M in {4, 8, 16}; the reference is the same batch with stage=1 x fsdp=2 on 2 of the devices.
The simulated devices share the host's cores, so an idle stage's work on garbage costs real
time, as it costs wall time on accelerators: measured bubble = 1 - t(stage=1) / t(stage=4).
Also printed, from the compiled step: collective-permute bytes per device per step, and the
fsdp collective bytes (flat in M when the weights are gathered once per step).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/pipeline_bubble.py
"""

from __future__ import annotations

import time

import jax

from bignlp_jax.config import load_config
from bignlp_jax.data import make_source
from bignlp_jax.model.pipeline import bubble_fraction
from bignlp_jax.perf.plan import abstract_batch, collective_bytes
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.state import abstract_state

STEPS = 6  # timed steps; the fastest counts (the cores are shared: the minimum is the least
# disturbed)


def step_time(cfg, devices) -> tuple[float, dict]:
    trainer = Trainer.build(cfg, devices)
    abstract = abstract_state(cfg.model, trainer.tx, trainer.state_sh)
    hlo = trainer.train_step.lower(abstract, abstract_batch(cfg, trainer.batch_sh)).compile(
    ).as_text()
    comm = collective_bytes(hlo, 8, dict(trainer.mesh.shape))
    state = trainer.layout.fresh()
    source = make_source(cfg, "train", trainer.rows)
    batch = trainer.device_batch(next(source))
    state, metrics = trainer.train_step(state, batch)  # compile and warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return min(times), comm


def main() -> None:
    print("| M | formula | measured | t stage=4 (s) | t stage=1 (s) | collective-permute "
          "MiB/dev/step | fsdp collectives MiB/dev/step |")
    print("|---|---|---|---|---|---|---|")
    for M in (4, 8, 16):
        base = ["model.num_layers=8", "data.seq_len=64", "data.source=synthetic",
                f"train.global_batch_size={2 * M}", "mesh.data=1", "mesh.fsdp=2",
                "run.dir=/tmp/pipeline_bubble"]
        staged = load_config("models/tiny_llama.yaml", [*base, "mesh.stage=4",
                                           f"train.pipeline_microbatches={M}"])
        flat = load_config("models/tiny_llama.yaml", base)
        t4, comm = step_time(staged, jax.devices())
        t1, _ = step_time(flat, jax.devices()[:2])
        mib = 2**20
        fsdp = sum(v for k, v in comm["by_axis"].items() if "fsdp" in k)
        print(f"| {M} | {bubble_fraction(4, M):.3f} | {1 - t1 / t4:.3f} | {t4:.3f} | {t1:.3f} "
              f"| {comm['collective-permute'] / mib:.2f} | {fsdp / mib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
