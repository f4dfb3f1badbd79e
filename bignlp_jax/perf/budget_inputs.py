"""What `plan --budget` was asked: the FLOPs budget, the devices, the MFU, the family and law.

Free of jax (the command re-executes itself with simulated devices before jax is imported),
except for the CPU's peak, which is measured: `--device cpu` means this host, its peak the
matmul probe that `bench` and the training log use (`train/peak.py`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from bignlp_jax.errors import UserError
from bignlp_jax.perf.devices import DEVICES, DeviceSpec
from bignlp_jax.perf.scaling_law import LAWS, Law, budget_flops, compute_optimal, days_for

DEFAULT_MFU = 0.4  # typical of well-tuned dense LLM pretraining on H100s (Llama 3: 38-43%)
DEFAULT_TARGET_DAYS = 30.0  # with --flops and no --devices: devices that finish in this long
BYTES_PER_PARAM = 16  # float32 parameters and gradients, two float32 AdamW moments
CPU = "cpu"
# The CPU backend refuses to compile for more simulated devices than this (4096 fails).
MAX_SIMULATED_DEVICES = 2048


@dataclass(frozen=True)
class Inputs:
    flops: float
    how: str  # how the budget was given, for the output and the config's header
    spec: DeviceSpec
    devices: int
    days: float | None  # budget days (--devices x --days) or the target days for --flops
    mfu: float
    mfu_source: str
    family: str
    law: Law
    seq_len: int
    vocab: int | None  # None: the family's vocabulary
    memory_gb: float


def cpu_spec(devices: int) -> DeviceSpec:
    """This host as the device(s): peak measured by the matmul probe, split over `devices`
    simulated devices as training splits it; memory the host's RAM, likewise split."""
    # Function-level import: the probe needs jax, which may be imported only after the re-exec.
    from bignlp_jax.train.peak import cpu_matmul_probe

    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return DeviceSpec(CPU, cpu_matmul_probe("float32") / devices, ram_gib / devices,
                      100.0, 100.0, devices)


def device_spec(kind: str, devices: int) -> DeviceSpec:
    """The accelerator table's entry for `kind` (the one place `plan --budget` reads peaks),
    or the measured host for `cpu`."""
    if kind == CPU:
        return cpu_spec(devices)
    if kind not in DEVICES:
        raise UserError(f"--device {kind!r} is not a device kind we know; use one of "
                        f"{', '.join([*sorted(DEVICES), CPU])}")
    return DEVICES[kind]


def simulated_devices(devices: int) -> int:
    """How many devices the mesh search compiles for: the largest divisor of `devices` that
    the CPU backend can simulate (budget.py scales the data axis back up)."""
    return max(d for d in range(1, min(devices, MAX_SIMULATED_DEVICES) + 1) if devices % d == 0)


def mfu_from_bench(path: str) -> float:
    """The MFU of a `bench` result: its JSON line (the last line of `bench`'s output, or a line
    of a .jsonl of results; the last one holding an `mfu` wins)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"--mfu-from {path}: cannot read it ({e.strerror}); pass the file "
                        "`bignlp-jax bench CONFIG > FILE` wrote") from None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("mfu"), (int, float)):
            return float(record["mfu"])
    raise UserError(f"--mfu-from {path}: no JSON line with an `mfu` in it; pass the output of "
                    "`bignlp-jax bench CONFIG > FILE`")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, got {value:g}")


def auto_devices(flops: float, spec: DeviceSpec, mfu: float, days: float, params: float,
                 memory_gb: float) -> int:
    """The fewest devices (a power of two) that train `flops` within `days` at `mfu` and hold
    the parameters, gradients and AdamW state of `params` fully sharded in 90% of memory."""
    need = max(flops / (spec.peak_tflops * 1e12 * mfu * days * 86400),
               params * BYTES_PER_PARAM / (0.9 * memory_gb * 2**30), 1.0)
    return 2 ** math.ceil(math.log2(need))


def resolve(args) -> Inputs:
    """Validate the `plan --budget` options and work out the FLOPs budget."""
    if args.law not in LAWS:
        raise UserError(f"--law {args.law!r} is unknown; use one of {', '.join(LAWS)}")
    _positive("--days", args.days)
    _positive("--flops", args.flops)
    _positive("--device-memory-gb", args.device_memory_gb)
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.vocab is not None and args.vocab < 2:
        raise UserError(f"--vocab must be at least 2, got {args.vocab}")
    if args.mfu is not None and args.mfu_from is not None:
        raise UserError("give --mfu or --mfu-from, not both")
    if args.mfu_from is not None:
        mfu, mfu_source = mfu_from_bench(args.mfu_from), f"measured by bench ({args.mfu_from})"
    elif args.mfu is not None:
        mfu, mfu_source = args.mfu, "--mfu"
    else:
        mfu, mfu_source = DEFAULT_MFU, (f"assumed: {DEFAULT_MFU:g}, typical of tuned dense "
                                        "pretraining on H100s; set --mfu or --mfu-from")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise UserError(f"MFU must be in (0, 1], got {mfu:g} ({mfu_source}); it is a fraction "
                        "of the device's peak, e.g. --mfu 0.4")
    if args.flops is None and (args.devices is None or args.days is None):
        raise UserError("--budget needs --flops C, or --devices N and --days D (with --device)")
    devices = args.devices if args.devices is not None else (1 if args.device == CPU else None)
    spec = device_spec(args.device, devices or 1)
    memory_gb = args.device_memory_gb if args.device_memory_gb is not None else spec.memory_gb
    law = LAWS[args.law]
    if args.flops is not None:
        flops = float(args.flops)
        how = f"--flops {flops:.3g}"
        if devices is None:  # enough devices to finish in --days (default 30)
            days = args.days or DEFAULT_TARGET_DAYS
            devices = auto_devices(flops, spec, mfu, days,
                                   compute_optimal(flops, law).params, memory_gb)
            how += f" on {devices} x {spec.name} (the fewest that finish in {days:g} days)"
        days = args.days if args.days is not None else days_for(flops, devices, spec.peak_tflops,
                                                                mfu)
    else:
        days = args.days
        assert devices is not None  # checked above: no --flops means --devices and --days
        flops = budget_flops(devices, spec.peak_tflops, mfu, days)
        how = (f"{devices} x {spec.name} ({spec.peak_tflops:g} TFLOP/s peak) x MFU {mfu:g} x "
               f"{days:g} days")
    return Inputs(flops, how, spec, devices, days, mfu, mfu_source, args.family, law,
                  args.seq_len, args.vocab, memory_gb)
