"""Where the libraries' own output goes: a run's job log shows the run's lines, its directory keeps the rest.

vLLM, DeepSpeed, torch, transformers and Ray write INFO and WARNING lines (and C++ log lines) from every actor
process; Ray forwards each worker's stdout/stderr to the driver, so by default they fill the job log (312 of the
450 lines of a default run were WARNINGs). Quiet mode (the default; ``logging.verbose: true`` turns it off):

* every Ray worker of the run (and the processes it starts: vLLM's engine core, DeepSpeed's ranks, verifier
  sandboxes) writes its stdout and stderr, file descriptors 1 and 2 included, to ``<run dir>/worker.log``
  (:func:`redirect_worker_output`, Ray's ``worker_process_setup_hook``), and the driver does not ask Ray to
  forward worker output (``log_to_driver=False``);
* in the driver, the libraries' loggers and Python warnings go to the same file (:func:`quiet_driver`); what the
  run prints itself (``print``) stays on stdout/stderr.

Nothing is dropped: ``worker.log`` has every line the job log used to have, prefixed with the process id.
Imports nothing heavy; the hook runs in every worker before its first task.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

LOG_ENV = "PASSK_RL_WORKER_LOG"  # the file a quiet run's workers write to
HOOK = "cluster.worker_logs.redirect_worker_output"
WORKER_LOG = "worker.log"
# Loggers of the libraries a run drives; in quiet mode the driver's copies write to the run's log file only.
LIBRARY_LOGGERS = ("ray", "vllm", "deepspeed", "torch", "transformers", "urllib3", "filelock", "huggingface_hub",
                   "DeepSpeed", "py.warnings")


def worker_env(log_file: Optional[str | Path]) -> Dict[str, str]:
    """Environment variables for the run's workers: where their output goes (quiet), or nothing (verbose)."""
    return {LOG_ENV: str(log_file)} if log_file else {}


class HarmlessReloadWarning(logging.Filter):
    """Drops vLLM's ``RotaryEmbedding: Failed to load weights``, logged at every weight sync, and nothing else.

    Why it is harmless (vLLM 0.32, model_executor/model_loader/reload/layerwise.py): the layerwise reload counts
    every parameter *and buffer* of a layer as loadable (``utils.get_layer_size``). A rotary embedding's only
    tensor is the non-persistent ``cos_sin_cache`` buffer, computed from the config (rope theta, head size,
    positions) and in no checkpoint, so no weight ever arrives for it; ``finalize_layerwise_processing`` then warns
    and puts the layer's original tensors back (``_place_kernel_tensors``) — the same cache, which is exactly what
    the layer must keep. Trained weights never live there. A layer with real weights that fail to load is still
    reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and str(record.args[0]).endswith("RotaryEmbedding"))


ENGINE_ERRORS_ENV = "PASSK_RL_ENGINE_ERRORS"  # per engine: where its processes' ERROR records also go


class EngineErrorFile(logging.Handler):
    """vLLM's ERROR records (with their tracebacks), appended to the file ``PASSK_RL_ENGINE_ERRORS`` names when the
    handler is made: an engine's worker and core processes inherit it from the ``VLLMGenerator`` that starts
    them, which reads the root cause back when the engine dies (:func:`engine_error`). Not set: does nothing."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.path = os.environ.get(ENGINE_ERRORS_ENV)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.path:
            return
        try:
            with open(self.path, "a") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise into the engine
            pass


def engine_error(path: str | Path) -> Optional[str]:
    """The root cause in an engine's error file: the first ``SomeError: text`` line (the innermost exception,
    logged by the worker process before the engine core and the client repeat it in general terms)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        line = line.strip()
        head, _, text = line.partition(": ")
        if text and head.isidentifier() and (head.endswith("Error") or head.endswith("Exception")):
            return line
    return None


def use_vllm_logging_config() -> None:
    """Point vLLM (in this process and the engine processes it starts) at :func:`_vllm_logging_config`, unless the
    user gave vLLM a logging config of their own."""
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = _vllm_logging_config()


def _vllm_logging_config() -> str:
    """vLLM's own default logging config (vllm/logger.py) with :class:`HarmlessReloadWarning` on its handler and
    :class:`EngineErrorFile` beside it, written to a file for ``VLLM_LOGGING_CONFIG_PATH`` (read by every vLLM
    process, the engine core included)."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    cfg = {"version": 1, "disable_existing_loggers": False,
           "filters": {"passk_harmless_reload": {"()": f"{__name__}.HarmlessReloadWarning"}},
           "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": "%m-%d %H:%M:%S",
                                   "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s "
                                             "[%(fileinfo)s:%(lineno)d] %(message)s",
                                   "log_level": level}},
           "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                                 "stream": "ext://sys.stdout", "filters": ["passk_harmless_reload"]},
                        "passk_engine_errors": {"()": f"{__name__}.EngineErrorFile"}},
           "loggers": {"vllm": {"handlers": ["vllm", "passk_engine_errors"], "level": level, "propagate": False}}}
    fd, path = tempfile.mkstemp(prefix="passk_rl_vllm_logging_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    return path


def redirect_worker_output() -> None:
    """Ray ``worker_process_setup_hook``: vLLM's logging without its per-sync harmless warning (unless the user
    gave vLLM a logging config), and, when ``PASSK_RL_WORKER_LOG`` is set (quiet runs), this worker's fds 1 and 2
    (and so every process it starts) pointed at that file, appending."""
    use_vllm_logging_config()
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def quiet_driver(log_file: str | Path) -> None:
    """In the driver: the libraries' log records and Python warnings go to ``log_file`` instead of the console
    (the run's own ``print`` lines are untouched)."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [driver pid {os.getpid()}]: "
                                           f"%(message)s"))
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger → the file
