"""Peak matmul throughput per device, the denominator of MFU.

Accelerators come from the table of published dense bf16 figures (parallel/devices.py), matched
by `device_kind` (MFU is conventionally quoted against the bf16 peak whatever dtype the model
runs in). A CPU has no
published figure that means anything for a given machine, so we measure one: a jitted square
matmul in the model's dtype, best of several runs, spread over the devices that share the host.
"""

from __future__ import annotations

import functools
import time

import jax

from bignlp_jax.model.flops import flops_per_token
from bignlp_jax.parallel.devices import spec_for_kind


def table_peak(device_kind: str) -> float | None:
    """Dense bf16 TFLOP/s of the accelerator `device_kind` names, or None if not in the table."""
    spec = spec_for_kind(device_kind)
    return spec.peak_tflops if spec is not None else None


@functools.lru_cache(maxsize=4)
def cpu_matmul_probe(dtype: str = "float32", n: int = 1024, repeats: int = 32) -> float:
    """Measured TFLOP/s of one n x n x n matmul on the host CPU (all its threads), best of runs
    (many of them: a shared VM slows down for stretches, and one slow stretch must not be the peak).

    Runs on the first device; on a CPU host every simulated device shares the same cores, so the
    figure is the host's, and `peak_tflops` divides it among the local devices."""
    device = jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compile and warm caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def peak_tflops(dtype: str = "float32", override: float | None = None,
                override_source: str = "--peak-tflops") -> tuple[float, str]:
    """(peak TFLOP/s per device, where the figure came from)."""
    if override is not None:
        return float(override), override_source
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        host = cpu_matmul_probe(dtype)
        where = f"cpu matmul probe (1024^3 {dtype}, host {host:.3f})"
        return host / jax.local_device_count(), where
    tflops = table_peak(device.device_kind)
    if tflops is None:
        raise KeyError(
            f"no peak figure for device kind {device.device_kind!r}; set train.peak_tflops "
            "(or pass --peak-tflops) to its dense bf16 TFLOP/s"
        )
    return tflops, f"table: {device.device_kind} dense bf16"


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model TFLOP/s per device over the device's peak."""
    return flops_per_token * tokens_per_sec / num_devices / 1e12 / peak


def mfu_meter(cfg, num_devices: int):
    """tokens/s -> MFU for `cfg` on `num_devices` devices (peak looked up or probed once);
    None on an accelerator missing from the table (set train.peak_tflops)."""
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    try:
        peak, _ = peak_tflops(cfg.model.dtype, cfg.train.peak_tflops)
    except KeyError:  # unknown accelerator: no MFU rather than a wrong one
        return lambda tokens_per_sec: None
    return lambda tokens_per_sec: mfu(fpt, tokens_per_sec, num_devices, peak)
