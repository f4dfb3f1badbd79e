"""Multi-process start-up: layout detection (flags, env, SLURM, GKE TPU) and a clear failure when
the coordinator cannot be reached."""

import argparse
import socket
import subprocess

import pytest
from conftest import bignlp_cmd

from bignlp_jax.parallel.distributed import _unreachable_message, add_arguments
from bignlp_jax.parallel.layout import (
    CoordinatorError,
    Layout,
    detect,
    first_slurm_host,
    loopback_only,
    tasks_on_node,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_single_process_by_default():
    assert detect(parse(), env={}) is None


def test_explicit_flags_and_env():
    layout = detect(parse("--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                          "--process-id", "3"), env={})
    assert (layout.coordinator, layout.num_processes, layout.process_id) == ("10.0.0.1:1234", 4, 3)
    env = {"BIGNLP_COORDINATOR": "host:99", "BIGNLP_NUM_PROCESSES": "2", "BIGNLP_PROCESS_ID": "0"}
    layout = detect(parse(), env=env)
    assert (layout.source, layout.coordinator, layout.process_id) == ("flags/env", "host:99", 0)
    # flags win over the environment
    assert detect(parse("--process-id", "1"), env=env).process_id == 1
    # one process is no job to join; --distributed off ignores everything
    assert detect(parse("--num-processes", "1"), env={}) is None
    assert detect(parse("--distributed", "off"), env=env) is None
    assert detect(parse(), env={**env, "BIGNLP_DISTRIBUTED": "off"}) is None


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2", "--process-id", "0"], "missing --coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "must be in 0..1"),
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
])
def test_explicit_layout_errors(argv, message):
    with pytest.raises(CoordinatorError, match=message):
        detect(parse(*argv), env={})


def slurm_env(**extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "4"}
    return {**env, **extra}


def test_slurm_step_layout():
    layout = detect(parse(), env=slurm_env())
    assert layout.source == "slurm"
    assert (layout.num_processes, layout.process_id) == (4, 1)
    assert layout.coordinator == f"gpu007:{61440 + 4242 % 4096}"
    # two tasks per node on GPUs that SLURM did not bind: each task takes its own device
    assert layout.local_device_ids == (1,)
    # one task per node: all local devices; CPU: never restrict
    one = slurm_env(SLURM_STEP_TASKS_PER_NODE="1(x4)")
    assert detect(parse(), env=one).local_device_ids is None
    assert detect(parse(), env=slurm_env(JAX_PLATFORMS="cpu")).local_device_ids is None
    port_set = slurm_env(BIGNLP_COORDINATOR_PORT="5000")
    assert detect(parse(), env=port_set).coordinator == "gpu007:5000"
    # devices are chosen by a flag (the environment carries the layout only)
    assert detect(parse("--local-device-ids", "0,1"), env=slurm_env()).local_device_ids == (0, 1)
    assert detect(parse("--local-device-ids", "all"), env=one).local_device_ids is None
    assert detect(parse(), env=slurm_env(BIGNLP_LOCAL_DEVICE_IDS="0,1")).local_device_ids == (1,)
    with pytest.raises(CoordinatorError, match="--local-device-ids 'gpu0'"):
        detect(parse("--local-device-ids", "gpu0"), env=slurm_env())


def test_timeouts_are_flags():
    from bignlp_jax.parallel.distributed import _timeout

    args = parse("--heartbeat-timeout", "7.5", "--shutdown-timeout", "30")
    assert (args.heartbeat_timeout, args.shutdown_timeout) == (7.5, 30.0)
    assert _timeout(args.heartbeat_timeout, "--heartbeat-timeout", 60) == 7.5
    assert _timeout(None, "--heartbeat-timeout", 60) == 60
    with pytest.raises(CoordinatorError, match="--init-timeout -1 must be a positive number"):
        _timeout(-1.0, "--init-timeout", 300)


def test_slurm_batch_script_and_single_task_are_not_distributed():
    batch = {k: v for k, v in slurm_env().items() if not k.startswith("SLURM_STEP")}
    assert detect(parse(), env=batch) is None
    assert detect(parse(), env=slurm_env(SLURM_STEP_NUM_TASKS="1")) is None


def test_slurm_host_lists():
    assert first_slurm_host("node001") == "node001"
    assert first_slurm_host("node001,host2") == "node001"
    assert first_slurm_host("gpu[003-010,12],cpu1") == "gpu003"
    assert first_slurm_host("rack[2,4]-n[07-09]") == "rack2-n07"
    assert tasks_on_node("4(x2),2", 2) == 2
    assert tasks_on_node("4(x2),2", 1) == 4


def test_gke_tpu_layout():
    env = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2",
           "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"}
    layout = detect(parse(), env=env)
    assert (layout.source, layout.num_processes, layout.process_id) == ("gke-tpu", 8, 6)
    assert layout.coordinator is None  # JAX's TPU detection supplies it
    assert detect(parse(), env={"TPU_WORKER_HOSTNAMES": "w-0", "TPU_WORKER_ID": "0"}) is None


def _resolving(monkeypatch, table: dict[str, list[str]]) -> None:
    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_host_name_that_resolves_to_loopback_is_named_in_the_timeout(monkeypatch):
    # Debian and Ubuntu put "127.0.1.1 <hostname>" in /etc/hosts: process 0 of a SLURM job binds
    # the service to its node name, and processes on the other nodes time out connecting
    _resolving(monkeypatch, {"node-0": ["127.0.1.1"], "node-1": ["10.1.2.3", "127.0.1.1"],
                             "node-6": ["::1"]})
    assert loopback_only("node-0") == "127.0.1.1" and loopback_only("node-6") == "::1"
    for host in ("node-1", "localhost", "127.0.0.1", "[::1]", "no-such-host"):
        assert loopback_only(host) is None, host  # a network address, or loopback on purpose
    slurm = Layout("slurm", 16, 0, "node-0:61441")
    message = _unreachable_message(slurm, 300)
    assert message.splitlines()[0].endswith(
        "node-0 resolves to 127.0.1.1 on this host, so the service listens for this host's "
        "processes only")
    assert "fix: pass --coordinator-bind with this host's network address" in message
    assert len(message.splitlines()) == 2
    # bound elsewhere on purpose, or a name other hosts can use: the general fix
    for layout, bind in ((slurm, "10.1.2.3"), (Layout("slurm", 16, 0, "node-1:61441"), None),
                         (Layout("slurm", 16, 3, "node-0:61441"), None)):
        message = _unreachable_message(layout, 300, bind)
        assert "--coordinator-bind" not in message and "reachable from every host" in message


@pytest.mark.slow
def test_unreachable_coordinator_fails_fast_with_address(cli_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    proc = subprocess.run(
        bignlp_cmd("--coordinator", address, "--num-processes", "2", "--process-id", "1",
                   "--init-timeout", "2", "describe", "tiny"),
        env=cli_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"could not reach the coordinator at {address} within 2 s" in proc.stderr
    assert "fix:" in proc.stderr
    assert "Check failure" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_coordinator_port_in_use_is_one_message(cli_env):
    """Process 0 starts the coordination service in a helper process; a port already taken
    gives one line and exit 2 (jaxlib itself sometimes crashes with SIGSEGV there)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            bignlp_cmd("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                       "--process-id", "0", "--init-timeout", "20", "describe", "tiny"),
            env=cli_env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert "Failed to start RPC server" in proc.stderr
    assert "fix: the coordinator port is probably in use" in proc.stderr


def test_service_in_helper_needs_jaxs_seam(caplog):
    """Process 0 moves JAX's coordination service into a helper through a private seam of jax
    (`jax._src.distributed._jax.get_distributed_runtime_service`). The jax we install has it;
    a jax without it keeps the service in process 0 and says so, instead of failing."""
    import types

    from jax._src import distributed as jax_distributed

    from bignlp_jax.parallel.coordination_host import ExternalService, ServiceElsewhere
    from bignlp_jax.parallel.distributed import service_in_helper

    proxy = service_in_helper(jax_distributed._jax, linger=5)
    assert isinstance(proxy, ServiceElsewhere)
    assert proxy.get_distributed_runtime_client is jax_distributed._jax.get_distributed_runtime_client
    with caplog.at_level("WARNING", logger="bignlp_jax"):
        assert service_in_helper(types.SimpleNamespace(), linger=5) is None
    assert "runs inside process 0" in caplog.text
    # an external service: process 0 starts nothing; without the seam it would start a second
    # service on the same port, so that is refused in one line
    external = service_in_helper(jax_distributed._jax, linger=5, external=True)
    assert isinstance(external.get_distributed_runtime_service("[::]:1", 2), ExternalService)
    with pytest.raises(CoordinatorError, match="cannot join an external one"):
        service_in_helper(types.SimpleNamespace(), linger=5, external=True)


def test_where_the_coordination_service_runs():
    env = {"BIGNLP_COORDINATOR": "host:99", "BIGNLP_NUM_PROCESSES": "2", "BIGNLP_PROCESS_ID": "0"}
    assert detect(parse(), env=env).service == "process0"
    assert detect(parse(), env={**env, "BIGNLP_COORDINATION_SERVICE": "external"}).service \
        == "external"
    assert detect(parse("--coordination-service", "external"), env=env).service == "external"
    assert detect(parse("--coordination-service", "process0"),  # the flag wins
                  env={**env, "BIGNLP_COORDINATION_SERVICE": "external"}).service == "process0"
    with pytest.raises(CoordinatorError, match="expected one of process0, external"):
        detect(parse(), env={**env, "BIGNLP_COORDINATION_SERVICE": "elsewhere"})
    tpu = {"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}  # JAX finds the coordinator
    assert detect(parse(), env=tpu).service == "process0"
    with pytest.raises(CoordinatorError, match="needs the coordinator's address"):
        detect(parse("--coordination-service", "external"), env=tpu)


def test_coordinator_command_refuses_a_port_in_use(cli_env):
    """`bignlp-jax coordinator` on a taken port: one line, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        proc = subprocess.run(bignlp_cmd("coordinator", "--bind", "127.0.0.1", "--port", port,
                                         "--processes", "2"), env={**cli_env,
                                                                   "JAX_PLATFORMS": "cpu"},
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "bignlp-jax coordinator: error: could not start the coordination service on " \
           f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_coordinator_on_a_loopback_host_name_says_who_can_join(monkeypatch, capsys):
    from bignlp_jax.parallel import coordination_host

    _resolving(monkeypatch, {"node-0": ["127.0.1.1"]})
    monkeypatch.setattr(socket, "gethostname", lambda: "node-0")
    bound = []

    def port_check(bind, port):  # stands in for the service: nothing is started
        bound.append(bind)
        raise CoordinatorError("stop here")
    monkeypatch.setattr(coordination_host, "_check_port_free", port_check)
    args = argparse.Namespace(processes=2, port=1234, bind=None, heartbeat_timeout=None,
                              shutdown_timeout=None, until="signal")
    with pytest.raises(CoordinatorError):
        coordination_host.cmd_coordinator(args)
    assert bound == ["node-0"]
    assert capsys.readouterr().err.strip() == (
        "coordinator: note: node-0 resolves to 127.0.1.1 on this host, so only its own "
        "processes can join; for processes on other hosts, --bind this host's network address")
    args.bind = "127.0.0.1"  # asked for: no note
    with pytest.raises(CoordinatorError):
        coordination_host.cmd_coordinator(args)
    assert capsys.readouterr().err == ""
