"""Generator: a real vLLM CPU engine checked against the HF model, and a GeneratorPool of 2 engines in Ray.

One engine per module (starting one takes ~30–90 s here). Logprobs are compared with an fp32 HF forward pass.
The engine tests are marked slow because of that start; tests/test_weight_sync.py keeps a real engine in CI
(generation, logprobs against HF, seeds, sync).
"""

from __future__ import annotations

import os

import pytest
import torch

from actors.generator import Sample, _check_sampling, assign_balanced, request_seed

PROMPTS = ["12+7=", "The cat", "x", "Once upon a time, in a land far away,"]


# ------------------------------------------------------------------------------------------------ units
def test_request_seeds_are_deterministic_and_spread():
    seeds = [request_seed(3, i) for i in range(1000)]
    assert seeds == [request_seed(3, i) for i in range(1000)]
    assert seeds != [request_seed(4, i) for i in range(1000)]
    assert all(0 <= s < 2**62 for s in seeds)
    # vLLM seeds the n sub-requests of prompt i with seed_i + j: ranges of 1000 must not overlap.
    s = sorted(seeds)
    assert min(b - a for a, b in zip(s, s[1:])) > 1000


def test_assign_balanced():
    parts = assign_balanced([5, 1, 1, 3, 2], [0, 0])
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]
    loads = [sum([5, 1, 1, 3, 2][i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 1
    assert assign_balanced([1, 1], [10, 0]) == [[], [0, 1]]  # work in flight counts
    assert assign_balanced([], [0, 0, 0]) == [[], [], []]
    with pytest.raises(ValueError, match="no engines"):
        assign_balanced([1], [])


def test_sampling_args_are_checked():
    with pytest.raises(ValueError) as e:
        _check_sampling(0, -1.0, 1.5, 0)
    for word in ("n must", "temperature", "top_p", "max_tokens"):
        assert word in str(e.value)


# ---------------------------------------------------------------------------------- real vLLM engine
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from passk_rl.models.tiny import build_random_model

    # A peakier random policy than the default init, so that samples and seeds visibly differ.
    return build_random_model(tmp_path_factory.mktemp("gen") / "model", seed=0, init_std=0.1)


@pytest.fixture(scope="module")
def engine(model_path):
    from actors.generator import VLLMGenerator

    gen = VLLMGenerator(str(model_path), seed=0, kv_cache_bytes=64 * 2**20, max_model_len=256)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_path))


def hf_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float() / temperature, dim=-1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return torch.tensor(logp[pos, torch.tensor(list(completion_ids))].tolist())


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.mark.slow
def test_generate_samples_logprobs_and_seeds(engine, hf):
    model, tok = hf
    out = engine.generate(PROMPTS, n=3, max_tokens=12, seed=7)
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            assert isinstance(s, Sample) and s.logprobs_mode == "raw_logprobs"
            assert s.prompt_token_ids == tok(prompt, add_special_tokens=False)["input_ids"]
            assert 1 <= len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
            assert s.finish_reason in ("stop", "length")
            assert s.finish_reason == "stop" or len(s.token_ids) == 12
            assert all(lp <= 0 for lp in s.logprobs)
            assert max_diff(s.logprobs, hf_logprobs(model, s.prompt_token_ids, s.token_ids)) < 1e-4
    # Samples of one prompt differ from each other; the same seed reproduces everything.
    assert len({tuple(s.token_ids) for s in out[3]}) > 1
    again = engine.generate(PROMPTS, n=3, max_tokens=12, seed=7)
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in out]
    other = engine.generate(PROMPTS, n=3, max_tokens=12, seed=8)
    assert [[s.token_ids for s in g] for g in other] != [[s.token_ids for s in g] for g in out]
    # A prompt's samples depend on (seed, its index), not on the rest of the batch: what the pool relies on.
    alone = engine.generate([PROMPTS[2]], n=3, max_tokens=12, seed=7, prompt_indices=[2])
    assert [s.token_ids for s in alone[0]] == [s.token_ids for s in out[2]]
    # Token-id prompts are used as given.
    by_ids = engine.generate([out[1][0].prompt_token_ids], n=3, max_tokens=12, seed=7, prompt_indices=[1])
    assert [s.token_ids for s in by_ids[0]] == [s.token_ids for s in out[1]]


@pytest.mark.slow
def test_logprobs_are_raw_at_other_temperatures(engine, hf):
    """Default ``logprobs_mode='raw_logprobs'``: temperature/top-p do not enter the returned logprobs."""
    model, _ = hf
    out = engine.generate(PROMPTS[:2], n=2, max_tokens=10, temperature=0.6, top_p=0.9, seed=3)
    for group in out:
        for s in group:
            want_t1 = hf_logprobs(model, s.prompt_token_ids, s.token_ids)
            assert max_diff(s.logprobs, want_t1) < 1e-4
            assert max_diff(s.logprobs, hf_logprobs(model, s.prompt_token_ids, s.token_ids, 0.6)) > 1e-2


@pytest.mark.slow
def test_score_matches_hf_and_stop_strings(engine, hf):
    model, tok = hf
    p = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+7=", "hello")]
    c = [tok(t, add_special_tokens=False)["input_ids"] for t in ("19", " world, again")]
    got = engine.score(p, c)
    assert [len(g) for g in got] == [2, 13]
    for pi, ci, g in zip(p, c, got):
        assert max_diff(g, hf_logprobs(model, pi, ci)) < 1e-4
    assert engine.score([p[0]], [[]]) == [[]]
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.score([[]], [c[0]])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.score([[5] * 250], [[5] * 10])
    # Stop strings end generation (the text is cut before the stop string).
    out = engine.generate(["Once upon a time"], n=8, max_tokens=24, seed=5, stop=["e"])
    for s in out[0]:
        assert "e" not in s.text
        assert s.finish_reason == "stop" or len(s.token_ids) == 24


# --------------------------------------------------------------------------------------------- Ray pool
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_pool_order_and_sync_reaches_every_engine(ray_cluster, model_path, engine, hf, tmp_path):
    from actors.generator import GeneratorPool
    from cluster.weight_sync import ShmSafetensorsTransport

    import copy

    model, tok = copy.deepcopy(hf[0]), hf[1]
    tr = ShmSafetensorsTransport(root="/dev/shm/passk_rl_test", run_name=f"pool_{os.getpid()}")
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.devices import device_spec
    from cluster.placement import bundles

    pg = placement_group(bundles(device_spec("cpu"), 2, 0.5, 1), strategy="PACK")
    ray_cluster.get(pg.ready(), timeout=60)
    pool = GeneratorPool(2, dict(model_path=str(model_path), seed=0, kv_cache_bytes=64 * 2**20, max_model_len=256,
                                 transport=tr), device="cpu", num_cpus_per_engine=0.5, placement_group=pg)
    try:
        assert len({i["pid"] for i in pool.engine_info}) == 2
        assert [i["placement_group_id"] for i in pool.engine_info] == [pg.id.hex()] * 2
        prompts = [f"{a}+{b}=" for a, b in [(1, 2), (30, 4), (5, 66), (7, 8), (9, 10)]] + ["The cat"]
        out = pool.generate(prompts, n=2, max_tokens=8, seed=11)
        assert [g[0].prompt_token_ids for g in out] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        assert pool.load == [0.0, 0.0]
        # Same samples as one engine given the same seed: seeds follow the prompt's index, not its engine.
        local = engine.generate(prompts, n=2, max_tokens=8, seed=11)
        assert [[s.token_ids for s in g] for g in out] == [[s.token_ids for s in g] for g in local]

        ids = [tok("12+7=", add_special_tokens=False)["input_ids"]]
        comp = [tok("19!", add_special_tokens=False)["input_ids"]]
        before = [pool.score(ids, comp, engine=e)[0] for e in range(2)]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        want = hf_logprobs(model, ids[0], comp[0])
        assert all(max_diff(b, want) > 1e-2 for b in before)
        report = pool.sync_weights(tr.publish(model.state_dict(), step=1))
        assert report["step"] == 1 and len(report["engines"]) == 2
        assert {r["pid"] for r in report["engines"]} == {i["pid"] for i in pool.engine_info}
        for e in range(2):
            assert max_diff(pool.score(ids, comp, engine=e)[0], want) < 1e-4
        split = pool.score(ids * 3, comp * 3)  # spread over both engines, back in order
        assert all(max_diff(r, want) < 1e-4 for r in split)
    finally:
        pool.shutdown()
        remove_placement_group(pg)
        tr.cleanup(keep_last=0)


# ------------------------------------------------------------------------------------------ an engine that cannot run
def _head_dim_16_model(out):
    """A tiny random Llama with head_dim 16 (vLLM's CPU attention supports a fixed set of head sizes; 16 is not
    among them), with the committed tokenizer of the built-in model: no hub."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "passk_rl" / "models" / "arith-base")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.mark.e2e
def test_an_engine_that_cannot_serve_this_model_stops_the_run_once_with_its_own_error(tmp_path):
    """The engine starts, then dies at its first forward ("Unsupported CPU attention configuration: head_dim=16"):
    the run stops at once (exit 4) with that text, and no engine is restarted."""
    from tests.test_faults import _run

    model = _head_dim_16_model(tmp_path / "hd16")
    r = _run(tmp_path, "hd16", f"model.path={model}", "run.steps=2")
    assert r.returncode == 4, r.stdout[-4000:]
    stopped = [line for line in r.stdout.splitlines() if line.startswith("training stopped:")]
    assert len(stopped) == 1 and "Unsupported CPU attention configuration: head_dim=16" in stopped[0], r.stdout[-4000:]
    assert "restarting it cannot help" in stopped[0]
    assert "starting a new one" not in r.stdout and "EngineLost" not in r.stdout
    # the engine's full output is in the run directory, not the console
    assert "Unsupported CPU attention configuration" in (tmp_path / "hd16" / "worker.log").read_text()
