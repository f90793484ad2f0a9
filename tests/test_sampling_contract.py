"""The sampling contract on real parts: samples drawn by a vLLM CPU engine at temperature T ≠ 1 are scored by the
DeepSpeed learner (2 ZeRO-2 ranks, built from the run config) at the same T, so the on-policy ratio is 1 on every
token and the update is the gradient of the shaping's objective for the policy that sampled; and the learner's
PPO epochs / mini-batches, reachable from YAML, really take several clipped steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actors.generator import VLLMGenerator
from actors.learner import LearnerGroup
from passk_rl import shaping
from passk_rl.config import load_config
from passk_rl.tasks import make_task
from passk_rl.tasks.make_base import BUILTIN_DIR

REPO = str(Path(__file__).resolve().parents[1])
T = 0.7


def _cfg(*overrides):
    return load_config(Path(REPO) / "configs" / "tiny_cpu.yaml",
                       [f"generator.temperature={T}", "learner.micro_batch_size=8", "learner.lr=1e-3", *overrides])


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def samples():
    """8 completions of one arith prompt at T = 0.7 with the engine's processed (tempered) logprobs, as a run
    at T = 0.7 configures it (GeneratorPool.from_config picks the mode; here the plain engine class)."""
    task = make_task("arith")
    prompt = task.prompts("train")[0]
    gen = VLLMGenerator(str(BUILTIN_DIR), seed=0, kv_cache_bytes=64 * 2**20, max_model_len=256,
                        logprobs_mode="processed_logprobs")
    try:
        out = gen.generate([task.format_prompt(prompt)], n=8, temperature=T, max_tokens=24, seed=5)[0]
    finally:
        gen.shutdown()
    rewards = np.array([[task.verify(prompt, s.text).reward for s in out]])
    return out, rewards


@pytest.fixture(scope="module")
def learner(ray_cluster):
    """One learner group for every test here (a DeepSpeed start-up each is what these tests cost): PPO epochs and
    mini-batches as the last test needs; scoring and the loss gradient do not depend on them. The last test
    steps the optimizer, so it stays last."""
    g = LearnerGroup.from_config(_cfg("learner.ppo_epochs=2", "learner.mini_batches=2", "learner.lr=5e-3"),
                                 str(BUILTIN_DIR))
    yield g
    g.shutdown()


def _tempered_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)], -1)
    return lp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_on_policy_ratio_is_one_on_every_token_at_t_07(learner, samples):
    out, _ = samples
    batch = [{"prompt_token_ids": s.prompt_token_ids, "response_token_ids": s.token_ids,
              "behaviour_logprobs": s.logprobs} for s in out]
    ours = learner.compute_logprobs(batch)
    diffs = [abs(a - b) for s, lp in zip(out, ours) for a, b in zip(s.logprobs, lp)]
    assert len(diffs) == sum(len(s.token_ids) for s in out) > 20
    assert max(diffs) < 1e-4, max(diffs)
    # the contract is what makes them agree: the same samples scored at temperature 1 are far off
    at_one = learner.compute_logprobs(batch, temperature=1.0)
    assert max(abs(a - b) for s, lp in zip(out, at_one) for a, b in zip(s.logprobs, lp)) > 1e-2


def test_update_is_the_shaped_gradient_of_the_tempered_policy(learner, samples):
    from transformers import AutoModelForCausalLM

    out, rewards = samples
    if rewards.min() == rewards.max():
        rewards = rewards.copy()
        rewards[0, :3] = 1 - rewards[0, :3]  # a group with both outcomes, so the advantages are not all zero
    adv = shaping.shape("pkpo_loo_minus_one", torch.tensor(rewards), k=4)[0]
    batch = [{"prompt_token_ids": s.prompt_token_ids, "response_token_ids": s.token_ids,
              "behaviour_logprobs": s.logprobs, "advantage": float(a)} for s, a in zip(out, adv)]
    from tests.learner_helpers import loss_gradient

    got = loss_gradient(learner, batch)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR, dtype=torch.float32)
    n = len(out)
    direct = -sum(float(adv[i]) * _tempered_logprobs(model, out[i].prompt_token_ids, out[i].token_ids, T).sum()
                  for i in range(n)) / n
    direct.backward()
    worst = max(float((got[name] - p.grad).abs().max()) for name, p in model.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    assert scale > 1e-4 and worst < 1e-4 * max(1.0, scale), (worst, scale)


def test_ppo_epochs_and_mini_batches_take_several_clipped_steps(learner, samples):
    out, _ = samples
    adv = np.linspace(-1.0, 1.0, len(out))
    batch = [{"prompt_token_ids": s.prompt_token_ids, "response_token_ids": s.token_ids,
              "behaviour_logprobs": s.logprobs, "advantage": float(a)} for s, a in zip(out, adv)]
    before = learner.gather_state_dict()
    m = learner.train_step(batch, step=1)
    after = learner.gather_state_dict()
    assert m["updates"] == 4.0
    # the first update is on-policy (ratio 1); the later ones see a moved policy
    assert m["ratio_max"] > 1.0 + 1e-3 or m["ratio_min"] < 1.0 - 1e-3
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3


def test_every_learner_config_field_reaches_the_worker():
    """LearnerGroup.from_config passes every LearnerConfig field by name: a field added to the config but not to
    LearnerOptions would fail at the first run; this test fails first."""
    import dataclasses

    from actors.learner import LearnerOptions
    from passk_rl.config import LearnerConfig

    params = LearnerOptions.flat_names()
    fields = {f.name for f in dataclasses.fields(LearnerConfig)} - set(LearnerGroup.PLACEMENT_FIELDS)
    assert fields <= params, fields - params
