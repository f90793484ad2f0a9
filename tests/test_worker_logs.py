"""Quiet logs: the filter drops exactly vLLM's harmless per-sync rotary warning, the engine's root cause is read back
from its error file, and a worker's output (C-level writes included) lands in the run's log file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from cluster.worker_logs import ENGINE_ERRORS_ENV, HarmlessReloadWarning, _vllm_logging_config, engine_error


def _record(msg, *args, level=logging.WARNING):
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", level, "layerwise.py", 266, msg,
                             args, None)


def test_only_the_rotary_reload_warning_is_dropped():
    f = HarmlessReloadWarning()
    assert not f.filter(_record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not f.filter(_record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    assert f.filter(_record("%s: Failed to load weights", "QKVParallelLinear"))  # real weights: still reported
    assert f.filter(_record("%s: Delayed processing", "RotaryEmbedding"))


def test_the_engines_root_cause_is_the_first_exception_line(tmp_path):
    p = tmp_path / "errors.log"
    p.write_text("WorkerProc hit an exception.\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0\n"
                 "EngineCore encountered a fatal error.\n"
                 "RuntimeError: Worker failed with error 'Unsupported ...', please check the stack trace above\n")
    assert engine_error(p) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
    assert engine_error(tmp_path / "missing") is None


def test_vllm_logging_config_keeps_vllms_level_and_adds_the_filter_and_error_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "warning")
    cfg = json.loads(open(_vllm_logging_config()).read())
    assert cfg["loggers"]["vllm"]["level"] == "WARNING" and not cfg["loggers"]["vllm"]["propagate"]
    assert cfg["handlers"]["vllm"]["filters"] == ["passk_harmless_reload"]
    assert "passk_engine_errors" in cfg["loggers"]["vllm"]["handlers"]


def test_a_redirected_worker_writes_everything_to_the_file(tmp_path):
    log = tmp_path / "worker.log"
    code = ("import os, sys; from cluster.worker_logs import redirect_worker_output; redirect_worker_output(); "
            "print('from python'); os.write(2, b'from fd 2\\n'); "
            "import subprocess; subprocess.run(['sh', '-c', 'echo from a child'])")
    env = dict(os.environ, PASSK_RL_WORKER_LOG=str(log))
    env.pop(ENGINE_ERRORS_ENV, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert sorted(log.read_text().splitlines()) == ["from a child", "from fd 2", "from python"]
