"""`bignlp-jax bench`: compile the real train step, time it, and report throughput and MFU.

The step is the one training uses (`Trainer.build` -> `make_train_step`), on the configured mesh.
Timing: `warmup` untimed steps, then `steps` timed ones, each ended by waiting for the new state,
so a step's time is what the device took plus whatever the host added (batch assembly included).
The batch for a step is fetched before the step is dispatched and not overlapped with it, so
`data_wait_fraction` (fetch time / step time) is an upper bound on what the input pipeline costs.

Model FLOPs come from `bignlp_jax.model.flops.flops_per_token` (PaLM: 6N + 12*L*H*Q*T per token,
no rematerialisation counted), so MFU does not reward recomputation.
"""

from __future__ import annotations

import resource
import statistics
import time

import jax

from bignlp_jax.config import Config
from bignlp_jax.errors import UserError
from bignlp_jax.model.flops import flops_per_token
from bignlp_jax.train.peak import mfu, peak_tflops


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes from XLA's memory analysis of a compiled program."""
    stats = compiled.memory_analysis()
    if stats is None:  # some backends do not report
        return {}
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(stats.generated_code_size_in_bytes),
    }
    # Donated outputs alias their inputs, so live bytes at the peak are roughly
    # arguments + outputs - aliased + temporaries; XLA's own peak figure is used when larger
    estimate = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    # (the CPU backend's own figure leaves temporaries out, hence the max).
    out["peak_bytes"] = max(int(getattr(stats, "peak_memory_in_bytes", 0) or 0), estimate)
    return out


class StepTimer:
    """The compiled train step with its state and batch source, ready to be timed.

    Built once; `run(n)` times n more steps. Kept separate from the report so a side-by-side
    benchmark can interleave rounds of this with another framework's steps."""

    def __init__(self, cfg: Config, log=print):
        # the CLI imports this module for its parser: load the training stack only when timing
        from bignlp_jax.data import make_source
        from bignlp_jax.train.loop import Trainer

        self.cfg = cfg
        self.trainer = Trainer.build(cfg)
        self.state = self.trainer.layout.fresh()
        self.source = make_source(cfg, "train", self.trainer.rows)
        batch = self.trainer.device_batch(next(self.source))
        start = time.perf_counter()
        self.compiled = self.trainer.train_step.lower(self.state, batch).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = compiled_memory(self.compiled)
        self.metrics: dict[str, jax.Array] | None = None  # of the last step run
        self.times: list[float] = []
        self.waits: list[float] = []
        self.faults: list[int] = []  # minor page faults of this process per step (see hugepages)
        log(f"compiled in {self.compile_s:.1f}s; peak memory/device "
            f"{self.memory.get('peak_bytes', 0) / 2**30:.3f} GiB")

    def run(self, steps: int, record: bool = True) -> None:
        """Run `steps` steps, each waited for; record their times unless warming up."""
        for _ in range(steps):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            batch = self.trainer.device_batch(next(self.source))
            t1 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, batch)
            jax.block_until_ready((self.state, self.metrics))
            t2 = time.perf_counter()
            if record:
                self.times.append(t2 - t0)
                self.waits.append(t1 - t0)
                self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    def report(self, peak_override: float | None = None) -> dict:
        """The figures `bench` prints, from the recorded steps."""
        cfg, times = self.cfg, self.times
        step_time = statistics.median(times)
        assert self.metrics is not None  # set by every step run; median() above needs one
        tokens_per_sec = cfg.train.global_batch_size * cfg.data.seq_len / step_time
        n_devices = self.trainer.mesh.size
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        if peak_override is None and cfg.train.peak_tflops is not None:
            peak_override, where = cfg.train.peak_tflops, "train.peak_tflops"
        else:
            where = "--peak-tflops"
        peak, peak_source = peak_tflops(cfg.model.dtype, peak_override, where)
        return {
            "config": cfg.model.name,
            "device_kind": jax.devices()[0].device_kind,
            "num_devices": n_devices,
            "mesh": dict(self.trainer.mesh.shape),
            "dtype": cfg.model.dtype,
            "remat": cfg.model.remat,
            "attention": cfg.model.attention,
            "global_batch_size": cfg.train.global_batch_size,
            "seq_len": cfg.data.seq_len,
            "steps": len(times),
            "tokens_per_sec": tokens_per_sec,
            "tokens_per_sec_per_device": tokens_per_sec / n_devices,
            "step_time_s": step_time,
            "step_time_spread": [min(times), max(times)],
            "compile_s": self.compile_s,
            "flops_per_token": fpt,
            "tflops_per_device": fpt * tokens_per_sec / n_devices / 1e12,
            "peak_tflops_per_device": peak,
            "peak_source": peak_source,
            "mfu": mfu(fpt, tokens_per_sec, n_devices, peak),
            "peak_memory_bytes_per_device": self.memory.get("peak_bytes"),
            "memory": self.memory,
            "data_wait_fraction": sum(self.waits) / sum(times),
            "page_faults_per_step": statistics.median(self.faults),
            "final_loss": float(self.metrics["loss"]),
        }


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3,
              peak_override: float | None = None, log=print) -> dict:
    """Compile, warm up, time `steps` train steps; returns the figures `bench` prints."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    timer = StepTimer(cfg, log)
    timer.run(warmup, record=False)
    timer.run(steps)
    result = timer.report(peak_override)
    result["warmup"] = warmup
    return result
