"""Multi-process start-up: join the processes of one job with `jax.distributed.initialize`.

Where the job layout (coordinator address, process count, this process's id) comes from; the
first that applies wins:

1. `--distributed off` (env `BIGNLP_DISTRIBUTED=off`): one process, whatever the environment says.
2. Explicit: `--coordinator HOST:PORT --num-processes N --process-id I` or the environment
   variables `BIGNLP_COORDINATOR`, `BIGNLP_NUM_PROCESSES`, `BIGNLP_PROCESS_ID` (set by
   `launch/local.py` and by the Kubernetes JobSets that `launch/k8s.py` renders).
3. SLURM: inside an `srun` step with more than one task. The coordinator is the step's first node;
   the batch script itself (no step) is never treated as distributed.
4. GKE TPU slices: `TPU_WORKER_HOSTNAMES` (set by GKE) names more than one host, or several
   slices (`MEGASCALE_NUM_SLICES`); JAX's own TPU detection fills in the details.

JAX aborts the whole process (a C++ fatal error with a stack dump) when the coordinator cannot be
reached in time, so a watchdog thread fires slightly earlier and exits with a message that names
the address and the fix. Once joined, a process that stops sending heartbeats for
`--heartbeat-timeout` seconds makes the others fail instead of hanging forever; the peer
watchdog (peer_watch.py) names it first, in one line. Process 0 hosts JAX's coordination service
in a helper process (coordination_host.py), so that losing process 0 is reported the same way
instead of ending every other process in JAX's C++ abort.

Environment variables carry the process layout only (as torchrun's and JAX's do); timeouts and
device choices are flags, so nothing else about a run comes from the environment.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from bignlp_jax.errors import UserError
from bignlp_jax.parallel.coordination_host import ServiceInHelper
from bignlp_jax.parallel.peer_watch import PeerWatchdog

# Defaults (seconds). Initialisation waits for every process to start: generous for slow
# container pulls; heartbeats detect a dead peer; shutdown waits for peers at exit.
INIT_TIMEOUT = 300.0
HEARTBEAT_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 120
# the peer watchdog names a silent process after this fraction of the heartbeat timeout: JAX's
# service may declare it dead from half the timeout on, and then aborts every process
STALE_FRACTION = 0.4
# SLURM: the coordinator port is derived from the job id, in a range above Linux's default
# ephemeral ports (32768-60999) so outgoing connections never hold it.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 61440, 4096

log = logging.getLogger(__name__)


class CoordinatorError(UserError):
    """The processes of a job could not be joined (unreachable coordinator, bad layout)."""


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the job. `coordinator` is None when JAX detects it (TPU)."""

    source: str  # "flags/env", "slurm" or "gke-tpu": named in messages
    num_processes: int
    process_id: int
    coordinator: str | None
    local_device_ids: tuple[int, ...] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Top-level options (given before the sub-command) for multi-process runs."""
    g = parser.add_argument_group(
        "multi-process options (normally detected from SLURM / Kubernetes / GKE TPU)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator (env BIGNLP_COORDINATOR)")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help="processes in the job (env BIGNLP_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1 (env BIGNLP_PROCESS_ID)")
    g.add_argument("--init-timeout", type=float, metavar="SECONDS",
                   help=f"give up joining the other processes after this long "
                        f"(default {INIT_TIMEOUT:g})")
    g.add_argument("--heartbeat-timeout", type=float, metavar="SECONDS",
                   help=f"a process silent this long fails the job (default {HEARTBEAT_TIMEOUT})")
    g.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help=f"wait this long for the other processes at exit "
                        f"(default {SHUTDOWN_TIMEOUT})")
    g.add_argument("--local-device-ids", metavar="IDS",
                   help="devices this process uses, e.g. 0,1 (default: all, or under SLURM "
                        "with one task per GPU, the task's own GPU)")
    g.add_argument("--distributed", choices=("auto", "off"),
                   help="off: run as a single process even under SLURM/Kubernetes "
                        "(env BIGNLP_DISTRIBUTED, default auto)")


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CoordinatorError(f"{name}={value!r} is not an integer") from None


def detect(args: argparse.Namespace | None = None,
           env: Mapping[str, str] = os.environ) -> Layout | None:
    """The job layout from flags and environment, or None for a single process."""
    get = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)
    mode = get("distributed") or env.get("BIGNLP_DISTRIBUTED", "auto")
    if mode not in ("auto", "off"):
        raise CoordinatorError(f"BIGNLP_DISTRIBUTED={mode!r}: expected 'auto' or 'off'")
    if mode == "off":
        return None
    explicit = _explicit_layout(get, env)
    if explicit is not None:
        return explicit if explicit.num_processes > 1 else None
    layout = _slurm_layout(env, get)
    return layout if layout is not None else _tpu_layout(env)


def _explicit_layout(get, env: Mapping[str, str]) -> Layout | None:
    coordinator = get("coordinator") or env.get("BIGNLP_COORDINATOR") or None
    num = get("num_processes")
    num = num if num is not None else _int(env.get("BIGNLP_NUM_PROCESSES"), "BIGNLP_NUM_PROCESSES")
    pid = get("process_id")
    pid = pid if pid is not None else _int(env.get("BIGNLP_PROCESS_ID"), "BIGNLP_PROCESS_ID")
    given = {"--coordinator": coordinator, "--num-processes": num, "--process-id": pid}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing and not (num == 1 and pid in (None, 0)):
        raise CoordinatorError(
            f"multi-process run is missing {', '.join(missing)} (given: "
            f"{', '.join(f'{k} {v}' for k, v in given.items() if v is not None)})\n"
            "  fix: pass all three of --coordinator HOST:PORT --num-processes N --process-id I "
            "(or BIGNLP_COORDINATOR, BIGNLP_NUM_PROCESSES, BIGNLP_PROCESS_ID)"
        )
    assert num is not None  # a missing count was refused above
    if num < 1 or not 0 <= (pid or 0) < num:
        raise CoordinatorError(
            f"--process-id {pid} must be in 0..{num - 1} (--num-processes {num})")
    if coordinator is not None and not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d+", coordinator):
        raise CoordinatorError(
            f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
    return Layout("flags/env", num, pid or 0, coordinator, _device_ids_override(get))


def _device_ids_override(get) -> tuple[int, ...] | None:
    """--local-device-ids: 'all' (or not given) lets a process use every local device."""
    value = (get("local_device_ids") or "all").strip()
    if value in ("", "all"):
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise CoordinatorError(
            f"--local-device-ids {value!r}: expected 'all' or ids like '0,1'") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM host list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed form, e.g. '4(x2),2' -> [4, 4, 2]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 1


def _slurm_layout(env: Mapping[str, str], get=lambda name: None) -> Layout | None:
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # not inside an srun step (e.g. the batch script itself)
    num = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_STEP_NUM_TASKS")
    if not num or num < 2:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    port = (env.get("BIGNLP_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
            or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN))
    ids = _device_ids_override(get)
    here = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0)))
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    on_cpu = env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if ids is None and here > 1 and not on_cpu and len(visible) != 1:
        # One task per GPU and SLURM did not bind GPUs to tasks: each task takes its own GPU.
        ids = (int(env.get("SLURM_LOCALID", 0)),)
    coordinator = f"{first_slurm_host(nodelist)}:{port}"
    return Layout("slurm", num, int(env["SLURM_PROCID"]), coordinator, ids)


def _tpu_layout(env: Mapping[str, str]) -> Layout | None:
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if not hosts or "TPU_WORKER_ID" not in env:
        return None
    per_slice = len(hosts.split(","))
    slices = _int(env.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
    if per_slice * slices < 2:
        return None
    slice_id = _int(env.get("MEGASCALE_SLICE_ID"), "MEGASCALE_SLICE_ID") or 0
    pid = slice_id * per_slice + int(env["TPU_WORKER_ID"])
    return Layout("gke-tpu", per_slice * slices, pid, None)


def _timeout(value: float | None, flag: str, default: float) -> float:
    if value is None:
        return default
    if value <= 0:
        raise CoordinatorError(f"{flag} {value:g} must be a positive number of seconds")
    return float(value)


def describe(layout: Layout) -> str:
    where = layout.coordinator or "detected by JAX from TPU_WORKER_HOSTNAMES"
    return (f"process {layout.process_id} of {layout.num_processes} "
            f"(layout from {layout.source}, coordinator {where})")


def _unreachable_message(layout: Layout, timeout: float) -> str:
    n, i, addr = layout.num_processes, layout.process_id, layout.coordinator or "(TPU worker 0)"
    if i == 0:
        what = (f"process 0 of {n} started the coordinator at {addr}, but not all {n} processes "
                f"joined within {timeout:g} s")
    else:
        what = f"process {i} of {n} could not reach the coordinator at {addr} within {timeout:g} s"
    return (
        f"{what} (layout from {layout.source})\n"
        f"  fix: check that all {n} processes were started with the same coordinator and "
        f"process count, that {addr} is reachable from every host (host name, port, firewall), "
        "or raise --init-timeout if hosts start slowly"
    )


def service_in_helper(jaxlib_module, linger: float) -> ServiceInHelper | None:
    """A stand-in for `jax._src.distributed._jax` that starts the coordination service in a
    helper process, or None (with a warning) for a jax that does not start it through that
    private seam (jax 0.10 does): the service then stays in process 0, as in plain JAX."""
    if hasattr(jaxlib_module, "get_distributed_runtime_service"):
        return ServiceInHelper(jaxlib_module, linger=linger)
    logging.getLogger("bignlp_jax").warning(
        "this jax starts its coordination service in a way bignlp_jax does not know, so it "
        "runs inside process 0: losing process 0 ends the others in JAX's own abort")
    return None


def initialize(layout: Layout, init_timeout: float = INIT_TIMEOUT, command: str = "",
               heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
               shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Join the job's processes; exits with a readable message if that takes too long."""
    import jax  # the layout is detected (and flags checked) before jax is loaded
    from jax._src import distributed as jax_distributed  # jax: after the layout is known

    # CPU processes exchange data through gloo (TCP); without it CPU collectives across
    # processes are not implemented. GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat, shutdown = int(math.ceil(heartbeat_timeout)), int(math.ceil(shutdown_timeout))
    prefix = f"bignlp-jax {command}".strip()

    def give_up() -> None:
        # JAX would abort with a C++ stack dump a little later; leave with a message instead.
        print(f"{prefix}: error: {_unreachable_message(layout, init_timeout)}",
              file=sys.stderr, flush=True)
        os._exit(CoordinatorError.exit_code)

    watchdog = threading.Timer(init_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    # JAX's own deadline comes later so that the watchdog speaks first.
    jax_timeout = int(math.ceil(init_timeout)) + 30
    real_jaxlib = getattr(jax_distributed, "_jax", None)
    if layout.process_id == 0 and layout.coordinator is not None:
        # the coordination service in a helper process, not in process 0: losing process 0
        # then ends the others with the watchdog's message, not JAX's abort (coordination_host)
        proxy = service_in_helper(real_jaxlib, linger=heartbeat)
        if proxy is not None:
            jax_distributed._jax = proxy
    try:
        if layout.coordinator is None:  # TPU: JAX reads the TPU_* / MEGASCALE_* variables
            jax.distributed.initialize(initialization_timeout=jax_timeout,
                                       heartbeat_timeout_seconds=heartbeat,
                                       shutdown_timeout_seconds=shutdown)
        else:
            jax.distributed.initialize(
                coordinator_address=layout.coordinator,
                num_processes=layout.num_processes,
                process_id=layout.process_id,
                local_device_ids=list(layout.local_device_ids) if layout.local_device_ids else None,
                # we resolved the layout ourselves: stop JAX from re-detecting (and overriding
                # local devices) from SLURM variables
                cluster_detection_method="deactivate",
                initialization_timeout=jax_timeout,
                heartbeat_timeout_seconds=heartbeat,
                shutdown_timeout_seconds=shutdown,
            )
    except (RuntimeError, ValueError) as e:
        hint = ""
        if layout.process_id == 0 and "RPC server" in str(e):
            hint = ("\n  fix: the coordinator port is probably in use on this host; choose "
                    "another (--coordinator HOST:PORT, or BIGNLP_COORDINATOR_PORT under SLURM)")
        raise CoordinatorError(f"could not join the job as {describe(layout)}: {e}{hint}") from None
    finally:
        if real_jaxlib is not None:
            jax_distributed._jax = real_jaxlib
        watchdog.cancel()
    configure_logging(jax.process_index(), jax.process_count())
    # JAX's client (private: jax.distributed keeps it in its global state) carries our watchdog's
    # key-value traffic; it fires well inside the heartbeat timeout, before JAX's C++ abort
    PeerWatchdog(jax_distributed.global_state.client, layout.process_id, layout.num_processes,
                 stale_after=max(2.0, STALE_FRACTION * heartbeat), command=prefix).start()
    log.info("joined %s; %d devices in all, %d here", describe(layout), jax.device_count(),
             jax.local_device_count())


def configure_logging(process_index: int, process_count: int) -> None:
    """Prefix log lines with the process; warnings from everyone, but our own progress (INFO)
    only from process 0. Libraries (Orbax, absl) stay at WARNING: their INFO is per-save noise."""
    logging.basicConfig(
        force=True,
        level=logging.WARNING,
        format=f"[process {process_index}/{process_count}] %(levelname)s %(name)s: %(message)s",
    )
    ours = logging.INFO if process_index == 0 else logging.WARNING
    logging.getLogger("bignlp_jax").setLevel(ours)


def maybe_initialize(args: argparse.Namespace | None = None) -> Layout | None:
    """Called by the CLI before any JAX use: joins the job when it is multi-process."""
    layout = detect(args)
    if layout is None:
        return None
    def timeout(name: str, default: float) -> float:
        return _timeout(getattr(args, name, None), f"--{name.replace('_', '-')}", default)

    initialize(layout, timeout("init_timeout", INIT_TIMEOUT), getattr(args, "command", "") or "",
               heartbeat_timeout=timeout("heartbeat_timeout", HEARTBEAT_TIMEOUT),
               shutdown_timeout=timeout("shutdown_timeout", SHUTDOWN_TIMEOUT))
    return layout
