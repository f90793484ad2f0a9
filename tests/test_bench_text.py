"""The benchmark task and model of configs/bench_medium.yaml: prompts are deterministic, the verifier checks what the
prompt asks for, a random character policy solves some prompts (rewards vary), and the config loads strictly."""

import random

import pytest

from passk_rl.config import load_config
from passk_rl.models.tiny import DEFAULT_ALPHABET
from passk_rl.tasks import make_task


def test_prompts_are_deterministic_and_splits_differ():
    a, b = make_task("bench_text"), make_task("bench_text")
    assert [p.text for p in a.prompts("train")] == [p.text for p in b.prompts("train")]
    assert [p.text for p in a.prompts("train")[:50]] != [p.text for p in a.prompts("test")[:50]]
    assert len({p.id for p in a.prompts("train")}) == len(a.prompts("train"))
    with pytest.raises(ValueError, match="unknown split"):
        a.prompts("sft")


def test_verify_checks_length_range_and_letter():
    t = make_task("bench_text", min_len=10, max_len=40, width=5)
    p = t.prompts("test")[0]
    lo, hi, c = p.answer["lo"], p.answer["hi"], p.answer["letter"]
    other = next(ch for ch in "xyz!" if ch != c)
    assert f"{lo} to {hi}" in p.text and f"letter {c}" in p.text
    assert t.verify(p, c * lo).reward == 1.0 and t.verify(p, c + other * (hi - 1)).reward == 1.0
    assert t.verify(p, c * (lo - 1)).reward == 0.0 and t.verify(p, c * (hi + 1)).reward == 0.0
    assert t.verify(p, other * lo).reward == 0.0
    assert {t.verify(p, s).status for s in ("", c * lo)} == {"ok"}


def test_a_random_policy_gets_varied_rewards():
    t = make_task("bench_text")
    rng = random.Random(0)
    rewards = []
    for p in t.prompts("train")[:400]:
        n = min(192, int(rng.expovariate(1 / 100)))
        rewards.append(t.verify(p, "".join(rng.choice(DEFAULT_ALPHABET) for _ in range(n))).reward)
    assert 0.05 < sum(rewards) / len(rewards) < 0.6


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="min_len"):
        make_task("bench_text", min_len=100, max_len=120, width=48)


def test_bench_medium_config_loads_strictly():
    cfg = load_config("configs/bench_medium.yaml")
    assert cfg.task.name == "bench_text" and cfg.generator.max_tokens >= 128 and cfg.model.spec.params_b > 0.01
    make_task(cfg.task.name, **cfg.task.params)


def test_bench_model_is_built_deterministically(tmp_path):
    from passk_rl.tasks import make_bench_model as mb

    recipe = dict(mb.RECIPE, hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128)
    a, b = mb.build(tmp_path / "a", recipe), mb.build(tmp_path / "b", recipe)
    assert mb.is_current(a, recipe) and not mb.is_current(a)  # the default recipe's key differs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
