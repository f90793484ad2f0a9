"""The tiny base model of the built-in task: cached deterministic build, HF/vLLM-loadable layout, and the band.

Fast tests build a miniature recipe (a few optimizer steps) in a temporary cache, and check the committed model
(``passk_rl/models/arith-base``: recipe key and weight checksum). The slow tests measure the committed model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from passk_rl.tasks import make_task
from passk_rl.tasks.make_base import (BUILTIN_DIR, MARKER, base_model_dir, builtin_base_model, commit_base_model,
                                      ensure_base_model, evaluate_passk, is_complete, make_recipe, recipe_key)

MINI = dict(steps=8, batch_size=16, warmup_steps=2, eval_prompts=4, eval_n=16, eval_ks=(1, 16))


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_base_model(cache, seed=0, **MINI)


def test_layout_and_marker(mini_cache):
    cache, path = mini_cache
    assert path == base_model_dir(cache, seed=0, **MINI)
    assert path.parent == cache / "models" and path.name.startswith("arith-base-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "base_eval.json",
                 "recipe.json", MARKER):
        assert (path / name).is_file(), name
    assert is_complete(path)
    # nothing half-built is left beside it
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_loads_with_transformers_and_ends_with_eos(mini_cache):
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    _, path = mini_cache
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path)
    gen = GenerationConfig.from_pretrained(path)
    assert tok.eos_token == "</s>" and gen.eos_token_id == tok.eos_token_id == model.config.eos_token_id
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # a head size vLLM CPU supports
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text = "Use 3 7 5 to make 26.\nAnswer: 3*7=21, 21+5=26"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ev = json.loads((path / "base_eval.json").read_text())
    assert ev["n"] == 16 and ev["num_prompts"] == 4 and 0.0 <= ev["pass@1"] <= ev["pass@16"] <= 1.0
    assert sum(ev["verifier_status"].values()) == 16 * 4


def test_reused_without_rebuilding(mini_cache):
    cache, path = mini_cache
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(cache, seed=0, **MINI) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_force_rebuild_is_bit_identical(mini_cache):
    cache, path = mini_cache
    before, eval_before = _digest(path), json.loads((path / "base_eval.json").read_text())
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(cache, seed=0, force=True, **MINI) == path
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp  # really rebuilt
    assert _digest(path) == before
    assert json.loads((path / "base_eval.json").read_text())["counts"] == eval_before["counts"]


def test_seed_and_recipe_change_the_cache_key(mini_cache):
    cache, path = mini_cache
    other = ensure_base_model(cache, seed=1, **MINI)
    assert other != path and _digest(other) != _digest(path)
    assert base_model_dir(cache, seed=0, **{**MINI, "steps": 9}) != path
    assert recipe_key(make_recipe(), 0) == recipe_key(make_recipe(), 0) != recipe_key(make_recipe(lr=1e-3), 0)


def test_incomplete_dir_is_rebuilt(tmp_path):
    path = base_model_dir(tmp_path, seed=0, **MINI)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")  # a crashed build: no marker
    assert ensure_base_model(tmp_path, seed=0, **MINI) == path
    assert is_complete(path) and (path / "model.safetensors").is_file()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PASSK_RL_CACHE", str(tmp_path))
    assert base_model_dir(seed=0) == tmp_path / "models" / f"arith-base-{recipe_key(make_recipe(), 0)}"


def test_bad_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown recipe parameter.*'stepz'"):
        make_recipe(stepz=3)
    with pytest.raises(ValueError, match="divisible"):
        make_recipe(hidden_size=100, num_heads=3)


# ------------------------------------------------------------------------------------------ the real base model
@pytest.fixture(scope="module")
def base_model():
    return builtin_base_model()  # the committed model every run starts from


def test_committed_base_model_matches_the_recipe_and_its_checksum():
    """Changing make_base's recipe without rebuilding (`make_base --commit`) fails here, not in a user's run."""
    path = builtin_base_model()
    meta = json.loads((path / "passk_rl_model.json").read_text())
    assert meta["key"] == recipe_key(make_recipe(), 0) == json.loads((path / "recipe.json").read_text())["key"]
    assert meta["sha256"] == _digest(path)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_a_tampered_or_stale_committed_model_is_refused(tmp_path, mini_cache):
    _, mini = mini_cache
    with pytest.raises(ValueError, match="seed-0"):
        commit_base_model(ensure_base_model(mini_cache[0], seed=1, **MINI), tmp_path / "x")
    import shutil

    d = tmp_path / "arith-base"
    shutil.copytree(BUILTIN_DIR, d)
    assert builtin_base_model(d) == d
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="sha256"):
        builtin_base_model(d)
    meta = json.loads((d / "passk_rl_model.json").read_text())
    (d / "passk_rl_model.json").write_text(json.dumps({**meta, "key": "000000000000"}))
    with pytest.raises(RuntimeError, match="recipe.*make_base --commit"):
        builtin_base_model(d)
    with pytest.raises(FileNotFoundError, match="missing"):
        builtin_base_model(tmp_path / "nowhere")


@pytest.mark.slow
def test_base_model_is_in_the_band(base_model):
    """Held-out pass@1 in [0.05, 0.6] and pass@16 >= 1.5 x pass@1 (n = 32, temperature 1, unbiased estimator).

    Re-measured here from the saved weights with a different sampling seed than the build's own evaluation.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    recorded = json.loads((base_model / "base_eval.json").read_text())
    task = make_task("arith", **recorded["task_params"])
    test = task.prompts("test")
    tok = AutoTokenizer.from_pretrained(base_model)
    model = LlamaForCausalLM.from_pretrained(base_model).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the sampled figures depend on the thread count only through float rounding
    try:
        ev = evaluate_passk(model, tok, task, test, n=32, ks=(1, 4, 16), seed=1234)
    finally:
        torch.set_num_threads(threads)
    p1, p4, p16 = ev["pass@1"], ev["pass@4"], ev["pass@16"]
    print(f"base model held-out ({len(test)} prompts, n=32): pass@1={p1:.3f} pass@4={p4:.3f} pass@16={p16:.3f}; "
          f"recorded at build: pass@1={recorded['pass@1']:.3f} pass@16={recorded['pass@16']:.3f}")
    assert 0.05 <= p1 <= 0.6
    assert p16 >= 1.5 * p1
    assert p16 < 0.97  # room left at large k too
    assert 0.05 <= recorded["pass@1"] <= 0.6 and recorded["pass@16"] >= 1.5 * recorded["pass@1"]
    # the recorded figures are the same model's: two independent estimates agree within sampling noise
    assert abs(p1 - recorded["pass@1"]) < 0.05
    # almost everything it writes is a readable answer: the verifier grades arithmetic, not format
    assert ev["verifier_status"].get("wrong_format", 0) < 0.05 * 32 * len(test)


@pytest.mark.slow
def test_cli_reuses_the_cached_model(base_model, capsys):
    from passk_rl.tasks.make_base import main

    stamp = (base_model / "model.safetensors").stat().st_mtime_ns
    assert main(["--out", str(base_model.parent.parent), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"reused {base_model}" in out and "pass@1=" in out
    assert (base_model / "model.safetensors").stat().st_mtime_ns == stamp
