"""Multi-process start-up: join the processes of one job with `jax.distributed.initialize`.

The job layout (who is who, where the coordinator is) comes from layout.py. JAX aborts the whole
process (a C++ fatal error with a stack dump) when the coordinator cannot be reached in time, so
a watchdog thread fires slightly earlier and exits with a message that names the address and the
fix. Once joined, a process that stops sending heartbeats for `--heartbeat-timeout` seconds makes
the others fail instead of hanging forever; the peer watchdog (peer_watch.py) names it first, in
one line. JAX's coordination service never runs inside a worker: process 0 hosts it in a helper
process, or it runs outside every worker (`--coordination-service external`: launch/local.py's
launcher, a JobSet's coordinator pod), see coordination_host.py. Losing process 0 is then
reported like losing any other process instead of ending the others in JAX's C++ abort.

Environment variables carry the process layout only (as torchrun's and JAX's do); timeouts and
device choices are flags, so nothing else about a run comes from the environment.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading

from bignlp_jax.compat import jax as compat_jax
from bignlp_jax.parallel.coordination_host import ServiceElsewhere
from bignlp_jax.parallel.layout import (
    HEARTBEAT_TIMEOUT,
    INIT_TIMEOUT,
    SERVICES,
    SHUTDOWN_TIMEOUT,
    CoordinatorError,
    Layout,
    describe,
    detect,
    loopback_only,
)
from bignlp_jax.parallel.peer_watch import PeerWatchdog

# the peer watchdog names a silent process after this fraction of the heartbeat timeout: JAX's
# service may declare it dead from half the timeout on, and then aborts every process
STALE_FRACTION = 0.4

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Top-level options (given before the sub-command) for multi-process runs."""
    g = parser.add_argument_group(
        "multi-process options (normally detected from SLURM / Kubernetes / GKE TPU)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator (env BIGNLP_COORDINATOR)")
    g.add_argument("--coordinator-bind", metavar="HOST",
                   help="address process 0's coordination service listens on (default: the "
                        "host of --coordinator, where the other processes reach it; JAX's "
                        "service has no authentication, so [::] exposes it to the network)")
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
    g.add_argument("--coordination-service", choices=SERVICES,
                   help="where JAX's coordination service runs: process0 (started by process 0, "
                        "in a helper process) or external (already listening at --coordinator: "
                        "launch/local.py, a JobSet's coordinator pod; env "
                        "BIGNLP_COORDINATION_SERVICE, default process0)")
    g.add_argument("--distributed", choices=("auto", "off"),
                   help="off: run as a single process even under SLURM/Kubernetes "
                        "(env BIGNLP_DISTRIBUTED, default auto)")


def _timeout(value: float | None, flag: str, default: float) -> float:
    if value is None:
        return default
    if value <= 0:
        raise CoordinatorError(f"{flag} {value:g} must be a positive number of seconds")
    return float(value)


def _unreachable_message(layout: Layout, timeout: float, bind: str | None = None) -> str:
    n, i, addr = layout.num_processes, layout.process_id, layout.coordinator or "(TPU worker 0)"
    if i == 0 and layout.service != "external":
        what = (f"process 0 of {n} started the coordinator at {addr}, but not all {n} processes "
                f"joined within {timeout:g} s")
        host = bind_address(addr, bind).rsplit(":", 1)[0] if layout.coordinator else ""
        local = loopback_only(host) if host else None
        if local is not None:
            return (f"{what} (layout from {layout.source}); {host} resolves to {local} on this "
                    "host, so the service listens for this host's processes only\n"
                    "  fix: pass --coordinator-bind with this host's network address (or map "
                    f"{host} to it in /etc/hosts) so that processes on other hosts can join")
    else:
        what = f"process {i} of {n} could not reach the coordinator at {addr} within {timeout:g} s"
    return (
        f"{what} (layout from {layout.source})\n"
        f"  fix: check that all {n} processes were started with the same coordinator and "
        f"process count, that {addr} is reachable from every host (host name, port, firewall), "
        "or raise --init-timeout if hosts start slowly"
    )


def service_in_helper(jaxlib_module, linger: float,
                      external: bool = False) -> ServiceElsewhere | None:
    """A stand-in for `jax._src.distributed._jax` that keeps the coordination service out of
    process 0: started in a helper process, or (`external`) already running elsewhere. None,
    with a warning, for a jax that does not start the service through that private seam (jax
    0.10 does): the service then stays in process 0, as in plain JAX. An external service
    cannot be joined without the seam (process 0 would start a second one): refused."""
    if hasattr(jaxlib_module, "get_distributed_runtime_service"):
        return ServiceElsewhere(jaxlib_module, linger=linger, external=external)
    if external:
        raise CoordinatorError(
            "this jax starts its coordination service in a way bignlp_jax does not know, so "
            "process 0 cannot join an external one (--coordination-service external)\n"
            "  fix: drop --coordination-service external (and BIGNLP_COORDINATION_SERVICE), or "
            "use the jax version pinned in pyproject.toml")
    logging.getLogger("bignlp_jax").warning(
        "this jax starts its coordination service in a way bignlp_jax does not know, so it "
        "runs inside process 0: losing process 0 ends the others in JAX's own abort")
    return None


def bind_address(coordinator: str, bind: str | None = None) -> str:
    """Where process 0's service listens: `bind` (default: the coordinator's own host, the
    address the other processes use) on the coordinator's port. JAX's default, `[::]`, is every
    interface, and its service answers anyone who connects."""
    host, port = coordinator.rsplit(":", 1)
    host = bind or host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    return f"{host}:{port}"


def initialize(layout: Layout, init_timeout: float = INIT_TIMEOUT, command: str = "",
               heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
               shutdown_timeout: float = SHUTDOWN_TIMEOUT, bind: str | None = None) -> None:
    """Join the job's processes; exits with a readable message if that takes too long."""
    import jax  # the layout is detected (and flags checked) before jax is loaded

    # CPU processes exchange data through gloo (TCP); without it CPU collectives across
    # processes are not implemented. GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat, shutdown = int(math.ceil(heartbeat_timeout)), int(math.ceil(shutdown_timeout))
    prefix = f"bignlp-jax {command}".strip()

    def give_up() -> None:
        # JAX would abort with a C++ stack dump a little later; leave with a message instead.
        print(f"{prefix}: error: {_unreachable_message(layout, init_timeout, bind)}",
              file=sys.stderr, flush=True)
        os._exit(CoordinatorError.exit_code)

    watchdog = threading.Timer(init_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    # JAX's own deadline comes later so that the watchdog speaks first.
    jax_timeout = int(math.ceil(init_timeout)) + 30
    real_jaxlib = compat_jax.distributed_jaxlib()
    if layout.process_id == 0 and layout.coordinator is not None:
        # the coordination service in a helper process or outside the job, not in process 0:
        # losing process 0 then ends the others with the watchdog's message, not JAX's abort
        proxy = service_in_helper(real_jaxlib, linger=heartbeat,
                                  external=layout.service == "external")
        if proxy is not None:
            compat_jax.set_distributed_jaxlib(proxy)
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
                coordinator_bind_address=bind_address(layout.coordinator, bind),
            )
    except (RuntimeError, ValueError) as e:
        hint = ""
        if layout.process_id == 0 and layout.service != "external" and "RPC server" in str(e):
            hint = ("\n  fix: the coordinator port is probably in use on this host; choose "
                    "another (--coordinator HOST:PORT, or BIGNLP_COORDINATOR_PORT under SLURM)")
        raise CoordinatorError(f"could not join the job as {describe(layout)}: {e}{hint}") from None
    finally:
        if real_jaxlib is not None:
            compat_jax.set_distributed_jaxlib(real_jaxlib)
        watchdog.cancel()
    configure_logging(jax.process_index(), jax.process_count())
    # JAX's client (private: jax.distributed keeps it in its global state) carries our watchdog's
    # key-value traffic; it fires well inside the heartbeat timeout, before JAX's C++ abort
    PeerWatchdog(compat_jax.distributed_client(), layout.process_id, layout.num_processes,
                 stale_after=max(2.0, STALE_FRACTION * heartbeat), command=prefix,
                 zero_is_coordinator=layout.service != "external",
                 shutdown_fn=jax.distributed.shutdown).start()
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
               shutdown_timeout=timeout("shutdown_timeout", SHUTDOWN_TIMEOUT),
               bind=getattr(args, "coordinator_bind", None))
    return layout
