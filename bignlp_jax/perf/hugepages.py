"""Transparent huge pages for XLA's CPU buffers, through glibc's `glibc.malloc.hugetlb` tunable.

Every run of a compiled program on the CPU backend allocates its temporary buffers afresh and
frees them at the end (1.5 GB per step for configs/bench/cpu_m.yaml). glibc serves allocations
that large straight from mmap, so each step faults all of those pages back in, 4 KiB at a time:
measured with getrusage, ~376,000 minor page faults and 1.2-1.4 CPU-seconds in the kernel per
cpu_m step (of ~10 CPU-seconds). With `glibc.malloc.hugetlb=1` glibc advises the kernel to back
those mappings with transparent huge pages (`madvise` mode, the usual default), which cuts the
faults to ~1,500 per step; the benchmark configs then train 15-20% faster.

glibc reads its tunables once, at process start, so the command-line entry points re-execute
themselves once with the tunable added. Nothing happens off Linux/glibc, or when GLIBC_TUNABLES
already names glibc.malloc.hugetlb (set `glibc.malloc.hugetlb=0` there to opt out). Kernels with
huge pages set to `never` ignore the advice; glibc before 2.35 ignores the tunable.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"


def tunables_with_huge_pages(current: str | None) -> str | None:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added; None if it already names hugetlb."""
    if current and any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
    """Re-execute this process with huge-page malloc, once; returns only if nothing changes.

    Call it first thing in a program's entry point, before threads or heavy imports (jax, torch):
    the process image is replaced, with the same pid, arguments and the rest of its environment."""
    if sys.platform != "linux" or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
    # the cheap check first: after the re-exec it ends here, before libc_ver reads the binary
    if tunables is None or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
