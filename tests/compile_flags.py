"""XLA_FLAGS for the suite and its subprocesses (no side effects: workers import it too).

The suite compiles with LLVM's optimisations off: on 2 CPU cores compiling is most of its time,
and the level changes how XLA's CPU code is generated, not the program (the HLO) our code
builds. tests/test_compile_level.py checks that a run at XLA's default level trains alike."""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
