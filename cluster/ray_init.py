"""The one place a process starts or joins Ray: the runtime environment its workers get, and a start-up that
survives a loaded machine.

Ray waits a fixed 30 s for a new node's raylet to register with the GCS and then raises a bare
``Exception("The current node timed out during startup ...")``; on a machine saturated by other jobs that can
happen once and then succeed. :func:`start_ray` retries that failure a few times with a growing wait, stopping
what the failed attempt left running in between, and raises :class:`RayStartupError` saying what to do when
every attempt failed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, TypeVar

# Actor processes import passk_rl/actors/cluster from this checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


class RayStartupError(RuntimeError):
    """Ray could not start a local cluster in any attempt."""


def _log(msg: str) -> None:
    print(f"[cluster.ray_init {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def runtime_env(root: str | Path = REPO_ROOT, *, worker_log: Optional[str | Path] = None) -> Dict[str, Any]:
    """Runtime env for every Ray worker: ``root`` first on PYTHONPATH (workers import the repository's packages,
    which need not be installed), no tokenizer thread pools, vLLM at WARNING unless the caller set a level (its
    per-request INFO lines would bury a run's own status lines), and ``cluster.worker_logs``' setup hook: vLLM's
    harmless per-sync reload warning dropped, and with ``worker_log`` every worker's output in that file."""
    from cluster.worker_logs import HOOK, worker_env

    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                         "TOKENIZERS_PARALLELISM": "false",
                         "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                         **worker_env(worker_log)},
            "worker_process_setup_hook": HOOK}


def in_ray_job() -> bool:
    """True inside ``ray job submit`` (or any process told where its cluster is)."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def is_startup_timeout(e: BaseException) -> bool:
    """Ray's raylet/GCS start-up timeout, the only start-up failure that waiting can cure."""
    return "timed out during startup" in str(e)


def _child_pids() -> Set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_new_children(before: Set[int]) -> None:
    """Stop the processes a failed start left behind: this process's descendants that were not there before it.

    A failed ``ray.init`` never sets Ray's global node, so ``ray.shutdown()`` alone leaves its GCS, raylet and
    helpers running; a retry would then compete with them for the very CPUs whose shortage caused the timeout.
    """
    import psutil

    new = []
    for pid in _child_pids() - before:
        try:
            new.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for p in new:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(new, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def retry_startup(start: Callable[[], T], *, cleanup: Callable[[], None], attempts: int = 3,
                  backoff_s: float = 10.0, log: Callable[[str], None] = _log) -> T:
    """``start()``, retried while it fails with Ray's start-up timeout (:func:`is_startup_timeout`).

    After each such failure ``cleanup()`` runs and the processes the failed attempt started are stopped; the wait
    before the next attempt doubles from ``backoff_s``. Any other error is raised at once. After ``attempts``
    timeouts raises :class:`RayStartupError` (from the last error) saying what happened and what to do.
    """
    if attempts < 1:
        raise ValueError(f"retry_startup: attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            return start()
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this timeout
            if not is_startup_timeout(e):
                raise
            cleanup()
            _stop_new_children(before)
            if attempt == attempts:
                load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
                raise RayStartupError(
                    f"Ray could not start a local cluster: in {attempts} attempts its raylet never registered within "
                    f"Ray's fixed 30 s (last error: {e}). The machine is probably overloaded (load average {load} "
                    f"on {os.cpu_count()} CPUs). Wait for other jobs to finish, or start a cluster once with "
                    f"`ray start --head` and join it instead of starting one here (training: the override "
                    f"cluster.address=auto)."
                ) from e
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"Ray did not start (attempt {attempt}/{attempts}: {e}); retrying in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def start_ray(*, address: str = "local", num_cpus: Optional[float] = None, log_to_driver: bool = True,
              join_ray_job: bool = True, root: str | Path = REPO_ROOT, attempts: int = 3, backoff_s: float = 10.0,
              log: Callable[[str], None] = _log, worker_log: Optional[str | Path] = None) -> bool:
    """Start or join Ray for this process, with :func:`runtime_env` for its workers; True when this call started a
    cluster (so the caller shuts down only what it started).

    - Ray already initialised in this process: nothing is done (False).
    - ``join_ray_job`` and inside a Ray job (RAY_JOB_ID / RAY_ADDRESS set): joins it with ``address="auto"``.
    - ``address="local"``: starts a private cluster with ``num_cpus`` logical CPUs and no dashboard, retried
      on a start-up timeout (:func:`retry_startup`).
    - any other address ("auto", "HOST:PORT", "ray://..."): joins that cluster.

    ``worker_log``: a file for every worker's stdout/stderr (``cluster.worker_logs``); then nothing is forwarded.
    """
    import ray

    if ray.is_initialized():
        return False
    env = runtime_env(root, worker_log=worker_log)
    if worker_log:
        log_to_driver = False
    if join_ray_job and in_ray_job():
        ray.init(address="auto", runtime_env=env, log_to_driver=log_to_driver)
        return False
    if address != "local":
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
        return False
    retry_startup(lambda: ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                                   log_to_driver=log_to_driver),
                  cleanup=ray.shutdown, attempts=attempts, backoff_s=backoff_s, log=log)
    return True
