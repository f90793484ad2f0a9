"""cluster.ray_init: the runtime env, the start-up retry loop (with a real failing function and real processes),
and one real start of a local cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.ray_init import REPO_ROOT, RayStartupError, retry_startup, runtime_env, start_ray

TIMEOUT = "The current node timed out during startup. This could happen because some of the raylet failed to startup"


class FailsThenStarts:
    """Raises Ray's start-up timeout ``failures`` times (each time leaving a real child process behind, as a
    half-started cluster does), then returns "started"."""

    def __init__(self, failures: int):
        self.failures, self.calls, self.left_behind = failures, 0, []

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            self.left_behind.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise Exception(TIMEOUT)  # the bare Exception Ray raises
        return "started"


def _dead(p: subprocess.Popen) -> bool:
    try:
        return p.wait(timeout=5) is not None
    except subprocess.TimeoutExpired:
        return False


def test_runtime_env_puts_the_repo_first_and_keeps_callers_settings(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    env = runtime_env("/repo")["env_vars"]
    assert env["PYTHONPATH"] == os.pathsep.join(["/repo", "/elsewhere"])
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    env = runtime_env()["env_vars"]
    assert env["PYTHONPATH"] == str(REPO_ROOT) and env["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_retry_recovers_after_timeouts_and_stops_what_each_failed_attempt_left():
    start, cleanups, logged = FailsThenStarts(2), [], []
    t0 = time.monotonic()
    out = retry_startup(start, cleanup=lambda: cleanups.append(start.calls), attempts=3, backoff_s=0.2,
                        log=logged.append)
    assert out == "started" and start.calls == 3
    assert cleanups == [1, 2]  # after each failed attempt, before the next
    assert time.monotonic() - t0 >= 0.2 + 0.4  # the wait doubles
    assert all(_dead(p) for p in start.left_behind)
    assert len(logged) == 2 and "attempt 1/3" in logged[0] and "retrying in 0.4 s" in logged[1]


def test_retry_gives_up_with_a_message_that_says_what_to_do():
    start = FailsThenStarts(5)
    with pytest.raises(RayStartupError) as info:
        retry_startup(start, cleanup=lambda: None, attempts=2, backoff_s=0.0, log=lambda m: None)
    assert start.calls == 2 and all(_dead(p) for p in start.left_behind)
    msg = str(info.value)
    assert "in 2 attempts" in msg and "overloaded" in msg and "cluster.address" in msg and TIMEOUT in msg
    assert str(info.value.__cause__) == TIMEOUT


def test_other_errors_are_not_retried():
    calls = []

    def bad_argument():
        calls.append(1)
        raise ValueError("num_cpus must be >= 0")

    with pytest.raises(ValueError, match="num_cpus"):
        retry_startup(bad_argument, cleanup=lambda: calls.append("cleanup"), attempts=3, backoff_s=0.0)
    assert calls == [1]
    with pytest.raises(ValueError, match="attempts"):
        retry_startup(lambda: None, cleanup=lambda: None, attempts=0)


def test_start_ray_starts_once_and_workers_see_the_runtime_env(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    assert not ray.is_initialized(), "another test left Ray running in this process"
    try:
        assert start_ray(address="local", num_cpus=1, log_to_driver=False) is True
        # a second call (or a caller that finds Ray up) neither starts another cluster nor claims this one
        assert start_ray(address="local", num_cpus=1) is False
        assert start_ray(address="auto") is False

        @ray.remote(num_cpus=0)
        def worker_env():
            import cluster.ray_init  # importable in the worker: the repository is on its PYTHONPATH

            return os.environ["PYTHONPATH"].split(os.pathsep)[0], os.environ["TOKENIZERS_PARALLELISM"]

        assert ray.get(worker_env.remote(), timeout=300) == (str(REPO_ROOT), "false")
    finally:
        ray.shutdown()
