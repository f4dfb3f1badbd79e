"""The peer watchdog's failure announcements, with a stand-in for JAX's key-value client (no
processes, no JAX): a process stopping on its own error tells the others, which stop at once
with one line naming it and with its exit code."""

import threading
import time

import pytest

from bignlp_jax.parallel import peer_watch
from bignlp_jax.parallel.peer_watch import PeerWatchdog


class Store:
    """The coordination service's key-value store, as the watchdog uses it."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.lock = threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.values[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(peer_watch, "INTERVAL", 0.02)
    monkeypatch.setattr(PeerWatchdog, "current", None)


def watchdog(store, me, exits):
    return PeerWatchdog(store, me, 2, stale_after=30, command="bignlp-jax train",
                        exit_fn=lambda code: exits.append((me, code)))


def test_a_failed_process_is_named_by_the_others_with_its_exit_code(fast, capsys):
    store, exits = Store(), []
    survivor = watchdog(store, 0, exits)
    survivor.thread.start()
    failed = watchdog(store, 1, exits)
    started = time.monotonic()
    failed.announce_failure("cannot save checkpoint step 3 in /runs/x/checkpoints: no space "
                            "left on the device (ENOSPC)\n  fix: free space", 2, wait=10)
    took = time.monotonic() - started
    survivor.thread.join(timeout=5)
    assert exits == [(0, 2)]
    assert took < 5  # it waited only until the survivor had read it and left
    err = capsys.readouterr().err
    assert ("bignlp-jax train: error: process 1 of 2 stopped: cannot save checkpoint step 3 in "
            "/runs/x/checkpoints: no space left on the device (ENOSPC) (its message says "
            "more); stopping process 0 too (exit 2)") in err
    assert "fix:" not in err  # the failed process's own message carries the fix


def test_stop_job_prints_announces_and_exits(fast, capsys):
    store, exits = Store(), []
    peer_watch.stop_job("ignored outside a job", 2)  # no watchdog: nothing happens
    assert exits == [] and capsys.readouterr().err == ""
    dog = watchdog(store, 1, exits)
    PeerWatchdog.current = dog
    store.key_value_set(f"{peer_watch.KEY_PREFIX}0", peer_watch.EXITED)  # the other has left
    peer_watch.stop_job("cannot save checkpoint step 3 in /c: permission denied (EACCES)", 2)
    assert exits == [(1, 2)] and dog.failed
    assert capsys.readouterr().err.startswith("\nbignlp-jax train: error: cannot save checkpoint")
    assert '"exit_code": 2' in store.values[f"{peer_watch.FAILED_PREFIX}1"]


def test_processes_failing_together_do_not_wait_for_each_other(fast):
    """Every process stopping on the same bad input: each announces and leaves at once."""
    store, exits = Store(), []
    one, two = watchdog(store, 0, exits), watchdog(store, 1, exits)
    one.announce_failure("bad config", 2, wait=0.2)  # nobody has read it: waits it out
    started = time.monotonic()
    two.announce_failure("bad config", 2, wait=10)  # ... but the peer failed too: no wait
    assert time.monotonic() - started < 1


def test_close_watches_through_the_shutdown_barrier_then_stops_the_thread(fast):
    """At exit: marked exited, JAX's shutdown run while the watchdog still runs, and the thread
    ended before the interpreter finalizes (a daemon thread inside a C++ call then aborts)."""
    store, exits = Store(), []
    seen_during_shutdown = []

    def shutdown():  # JAX's barrier: the watchdog must still be watching here
        time.sleep(0.1)
        seen_during_shutdown.append(dog.thread.is_alive())

    dog = PeerWatchdog(store, 0, 2, stale_after=30, exit_fn=lambda code: exits.append(code),
                       shutdown_fn=shutdown)
    dog.thread.start()
    store.key_value_set(f"{peer_watch.KEY_PREFIX}1", "1")
    dog.close(join_timeout=5)
    assert seen_during_shutdown == [True]
    assert not dog.thread.is_alive() and exits == []
    assert store.values[f"{peer_watch.KEY_PREFIX}0"] == peer_watch.EXITED
