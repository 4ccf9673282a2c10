"""The watchdog without MPI: ``ARRAYSYNCBN_TIMEOUT``, call labels, the poll, thread groups.

The same deadline under real ``mpiexec`` (a skipped call aborts the job and
names the call) is tested in ``tests/test_mpi.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.comm import watchdog
from arraysyncbn.comm.calls import (
    CallLabel,
    active_call,
    current_call,
    describe_active,
    next_call,
)
from arraysyncbn.comm.watchdog import TIMEOUT_ENV, parse_timeout, resolve_timeout, wait_for

ROOT = Path(__file__).resolve().parents[1]


# -- ARRAYSYNCBN_TIMEOUT ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [(None, 600.0), ("", 600.0), ("  ", 600.0), ("2", 2.0), (" 0.25 ", 0.25), ("1e3", 1000.0),
     ("0", None), ("0.0", None)],
)  # fmt: skip
def test_timeout_values_parse(text: str | None, want: float | None) -> None:
    assert parse_timeout(text) == want


@pytest.mark.parametrize("text", ["soon", "-1", "-0.5", "nan", "inf", "10s", "1,5"])
def test_malformed_timeouts_are_rejected_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=f"ARRAYSYNCBN_TIMEOUT={text!r} is not understood"):
        parse_timeout(text)


def test_timeout_argument_overrides_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "not read when timeout= is given")
    assert resolve_timeout(3) == 3.0 and resolve_timeout(np.float32(0.5)) == 0.5
    assert resolve_timeout(0) is None
    with pytest.raises(ValueError, match="is not understood"):
        resolve_timeout(None)
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert resolve_timeout(None) == 7.5


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True])
def test_bad_timeout_arguments_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        resolve_timeout(bad)  # type: ignore[arg-type]


# -- call labels --------------------------------------------------------------------------
def test_labels_describe_the_call() -> None:
    assert CallLabel("forward", 7, layer=2).describe() == "SyncBatchNorm layer 2, call 7, forward"
    assert CallLabel("check", None).describe() == (
        "SyncBN call ?, check (functional API, no layer number)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [(("sideways", 1), "pass_ must be one of"), (("forward", 0), "call must be"),
     (("forward", True), "call must be"), (("forward", 1, -2), "layer must be"),
     (("forward", 1.0), "call must be")],
)  # fmt: skip
def test_labels_are_validated(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CallLabel(*args)


def test_calls_are_counted_per_communicator_and_pass() -> None:
    a, b = sbn.thread_group(2)
    labels = [next_call(a, "forward"), next_call(a, "backward"), next_call(a, "forward"),
              next_call(b, "forward"), next_call(a, "check", layer=4)]  # fmt: skip
    assert labels == [
        CallLabel("forward", 1),
        CallLabel("backward", 1),
        CallLabel("forward", 2),
        CallLabel("forward", 1),
        CallLabel("check", 1, layer=4),
    ]
    with pytest.raises(ValueError, match="pass_ must be one of"):
        next_call(a, "both")  # type: ignore[arg-type]


def test_a_communicator_that_cannot_be_counted_gets_an_unknown_call_number() -> None:
    class Slotted:  # no __weakref__: the registry cannot hold it
        __slots__ = ()

    assert next_call(Slotted(), "forward") == CallLabel("forward", None)


def test_the_active_call_is_set_for_the_block_only_and_per_thread() -> None:
    assert active_call() is None
    assert describe_active() == "an allreduce outside any SyncBN call"
    outer, inner = CallLabel("forward", 1), CallLabel("check", 1)
    seen_by_other_thread: list[object] = []
    with current_call(outer):
        with current_call(inner):
            assert active_call() is inner
        assert active_call() is outer
        other = threading.Thread(target=lambda: seen_by_other_thread.append(active_call()))
        other.start()
        other.join()
    assert active_call() is None
    assert seen_by_other_thread == [None]
    with pytest.raises(TypeError, match="CallLabel"):
        with current_call("forward"):  # type: ignore[arg-type]
            pass


def test_functional_labels_each_collective() -> None:
    """Forward statistics, backward sums and the check each run under their label."""

    class Recording(sbn.SelfCommunicator):
        def __init__(self) -> None:
            self.labels: list[CallLabel | None] = []

        def allreduce(self, buf, op="sum"):
            self.labels.append(active_call())
            return buf

    comm = Recording()
    bn = sbn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(0).normal(size=(4, 3))
    for _ in range(2):
        bn.backward(bn(x))
    assert comm.labels == [
        CallLabel("check", 1, layer=1),
        CallLabel("forward", 1, layer=1),
        CallLabel("backward", 1, layer=1),
        CallLabel("forward", 2, layer=1),
        CallLabel("backward", 2, layer=1),
    ]
    assert active_call() is None
    comm.labels.clear()  # the functional API: counted per communicator, no layer
    for _ in range(2):
        *_, saved = sbn.sync_batch_norm_forward(x, None, None, None, None, axis=1, comm=comm)
        sbn.sync_batch_norm_backward(x, saved)
    assert comm.labels == [
        CallLabel("forward", 1),
        CallLabel("backward", 1),
        CallLabel("forward", 2),
        CallLabel("backward", 2),
    ]


# -- the poll -----------------------------------------------------------------------------
class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.yields = 0

    def clock(self) -> float:
        self.now += 1e-6  # every look at the clock costs a microsecond
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def yield_(self) -> None:
        self.yields += 1
        self.now += 1e-4  # another process ran for a while


def test_a_quick_completion_never_sleeps() -> None:
    fake = FakeTime()
    results = iter([False] * 50 + [True])
    assert wait_for(lambda: next(results), 10.0, clock=fake.clock, sleep=fake.sleep) is None
    assert fake.sleeps == []


def test_every_poll_yields_the_core_from_the_start() -> None:
    """No pure spin: with more ranks than cores it starved the late ranks
    (4 ranks on 2 cores: 5 ms per allreduce instead of 15 µs)."""
    fake = FakeTime()
    results = iter([False, False, False, True])
    assert (
        wait_for(
            lambda: next(results), 10.0, clock=fake.clock, sleep=fake.sleep, yield_=fake.yield_
        )
        is None
    )
    assert fake.yields == 3 and fake.sleeps == []


def test_a_wait_of_milliseconds_yields_the_core_but_never_sleeps() -> None:
    """More ranks than cores: the late rank needs this core; sleeping through
    the wait would add a whole sleep to every step."""
    fake = FakeTime()
    done_at = 0.05
    got = wait_for(
        lambda: fake.now >= done_at, 10.0, clock=fake.clock, sleep=fake.sleep, yield_=fake.yield_
    )
    assert got is None and fake.sleeps == [] and fake.yields > 0
    assert fake.now - done_at <= 2e-4


def test_a_long_wait_spins_then_sleeps_more_and_more_up_to_the_cap() -> None:
    fake = FakeTime()
    done_at = 3.0

    got = wait_for(
        lambda: fake.now >= done_at, 10.0, clock=fake.clock, sleep=fake.sleep, yield_=fake.yield_
    )
    assert got is None
    sleeps = fake.sleeps
    assert sleeps, "a long wait must not spin or yield all along"
    assert fake.yields > 0, "it yields before it sleeps"
    assert sleeps == sorted(sleeps) and max(sleeps) == watchdog.MAX_SLEEP_SECONDS
    first = min(watchdog.MAX_SLEEP_SECONDS, watchdog.YIELD_SECONDS * watchdog.SLEEP_FRACTION)
    assert sleeps[0] == pytest.approx(first, rel=0.01)
    # Completion is seen within one (capped) sleep of the moment it happened.
    assert fake.now - done_at <= watchdog.MAX_SLEEP_SECONDS + 1e-5


def test_an_expired_wait_returns_the_seconds_waited() -> None:
    fake = FakeTime()
    waited = wait_for(lambda: False, 2.0, clock=fake.clock, sleep=fake.sleep, yield_=fake.yield_)
    assert waited is not None and 2.0 <= waited < 2.0 + 2 * watchdog.MAX_SLEEP_SECONDS


def test_no_timeout_waits_as_long_as_it_takes() -> None:
    fake = FakeTime()
    assert (
        wait_for(
            lambda: fake.now > 5000.0, None, clock=fake.clock, sleep=fake.sleep, yield_=fake.yield_
        )
        is None
    )


# -- thread groups ------------------------------------------------------------------------
def _skip_third_forward(comm: sbn.ThreadCommunicator, skipped: str = "forward") -> str:
    """Rank 1 is in eval mode (or skips the backward) on step 3."""
    bn = sbn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(comm.rank).normal(size=(4, 3))
    for step in (1, 2, 3):
        skip = comm.rank == 1 and step == 3
        if skip and skipped == "forward":
            bn.eval()
        y = bn(x)
        if not skip:
            bn.backward(y)
    return "finished"


@pytest.mark.parametrize("skipped", ["forward", "backward"])
def test_thread_group_timeout_names_the_call(skipped: str) -> None:
    start = time.monotonic()
    results = sbn.run_ranks(
        lambda c: _skip_third_forward(c, skipped),
        sbn.thread_group(2, timeout=0.3),
        return_exceptions=True,
    )
    assert time.monotonic() - start < 5
    assert results[1] == "finished"
    error = results[0]
    assert isinstance(error, sbn.CommunicatorAbortedError)
    message = str(error)
    assert f"rank 0 waited 0.3 s in SyncBatchNorm layer 1, call 3, {skipped}" in message, message
    assert "ARRAYSYNCBN_TIMEOUT" in message and "thread_group(timeout=)" in message


def test_thread_group_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "0.2")
    comms = sbn.thread_group(2)
    assert comms[0].group.timeout == 0.2
    start = time.monotonic()
    results = sbn.run_ranks(_skip_third_forward, comms, return_exceptions=True)
    assert time.monotonic() - start < 5
    assert isinstance(results[0], sbn.CommunicatorAbortedError)
    assert "the limit is 0.2 s" in str(results[0])


def test_thread_group_timeout_argument_wins_over_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "0.05")
    assert sbn.thread_group(2, timeout=30)[0].group.timeout == 30.0
    assert sbn.thread_group(2, timeout=0)[0].group.timeout is None  # waits forever
    monkeypatch.delenv(TIMEOUT_ENV)
    assert sbn.thread_group(2)[0].group.timeout == watchdog.DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "-3")
    with pytest.raises(ValueError, match="ARRAYSYNCBN_TIMEOUT='-3' is not understood"):
        sbn.thread_group(2)


def test_a_healthy_thread_group_is_unaffected_by_a_short_timeout() -> None:
    """Many quick collectives under a short limit: none may time out."""
    comms = sbn.thread_group(3, timeout=2)

    def rank(comm: sbn.ThreadCommunicator) -> float:
        bn = sbn.SyncBatchNorm(2, comm=comm)
        x = np.random.default_rng(comm.rank).normal(size=(3, 2))
        for _ in range(20):
            bn.backward(bn(x))
        return float(np.sum(bn.running_mean))

    sums = sbn.run_ranks(rank, comms)
    assert sums[0] == sums[1] == sums[2] and sums[0] != 0.0


# -- MPICommunicator in a world of one (MPI as a singleton, in a subprocess) ---------------
def test_mpi_communicator_reads_the_timeout_and_polls_a_nonblocking_allreduce() -> None:
    """Which MPI call a communicator makes follows its timeout: ``Iallreduce``
    polled under a deadline, or the blocking ``Allreduce`` for 0 (forever)."""
    pytest.importorskip("mpi4py")
    code = """
import os
import numpy as np
import arraysyncbn as sbn

class Spy:
    def __init__(self, real):
        self.real, self.calls = real, []
    def Allreduce(self, *args, **kwargs):
        self.calls.append("Allreduce")
        return self.real.Allreduce(*args, **kwargs)
    def Iallreduce(self, *args, **kwargs):
        self.calls.append("Iallreduce")
        return self.real.Iallreduce(*args, **kwargs)
    def __getattr__(self, name):
        return getattr(self.real, name)

for env, kwargs in [(None, {}), ("2.5", {}), ("0", {}), ("2.5", {"timeout": 0}),
                    ("bad", {"timeout": 4})]:
    if env is None:
        os.environ.pop("ARRAYSYNCBN_TIMEOUT", None)
    else:
        os.environ["ARRAYSYNCBN_TIMEOUT"] = env
    comm = sbn.MPICommunicator(**kwargs)
    spy = comm.comm = Spy(comm.comm)
    out = comm.allreduce(np.array([1.0, 2.0]))
    assert out.tolist() == [1.0, 2.0]
    print(comm.timeout, spy.calls)
os.environ["ARRAYSYNCBN_TIMEOUT"] = "-1"
try:
    sbn.MPICommunicator()
except ValueError as e:
    print("ValueError", e)
"""
    lines = _python(code).splitlines()
    assert lines[:5] == [
        "600.0 ['Iallreduce']",
        "2.5 ['Iallreduce']",
        "None ['Allreduce']",
        "None ['Allreduce']",
        "4.0 ['Iallreduce']",
    ]
    assert lines[5].startswith("ValueError ARRAYSYNCBN_TIMEOUT='-1' is not understood")


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (MPI initializes once per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
