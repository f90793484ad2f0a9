"""bfloat16 end to end (issue 19): engines and learner in bf16, DeepSpeed's fp32 master weights, the stream in bf16,
the post-sync probe at a tolerance bf16 justifies, and a tampered tensor still caught at it. And the refusal: where
the CPU cannot run bf16, the launch says so before any actor starts (no silent float32).

The tolerance. bf16 keeps 8 significant bits (7 stored + the implicit one), so one rounding moves a value by up
to u = 2^-8 ≈ 3.9e-3 of itself (``torch.finfo(torch.bfloat16).eps`` = 2^-7 is the spacing at 1; rounding to
nearest is off by at most half of it). A logprob is z_t − logsumexp(z), so an error δ on the logits moves it by at
most 2·max|δ|. Each side writes its logits in bf16: up to u·max|z| each, 2u·max|z| between two sides that round
differently (vLLM's CPU kernels and torch's do), 4u·max|z| on the logprob. The lm_head's input, the final-normed
hidden state, is itself a bf16 rounding of a value both sides computed through different kernels, which adds about
as much again: 8u·max|z|, with max|z| ≥ 1 as the floor for tiny logits. So TOL = 8u·max(1, max|z|), where max|z|
is measured on the probe from the learner's weights. In fp32 the same pipeline agrees to ~1e-6.

The model is the Qwen2 with untied embeddings (qkv bias): the architecture and ZeRO stage of
configs/qwen2.5-7b_910b_x20.yaml, which trains in bf16. (Tied models have their own problem in every dtype:
tests/test_architectures.py, TIED_LM_HEAD_STALE.)
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.test_architectures import Bench, engine_logprobs, set_engine_transport, tamper
from tests.tiny_archs import tamper_target

U = 2.0 ** -8  # bf16 unit roundoff


def bf16_tolerance(max_abs_logit: float) -> float:
    return 8 * U * max(1.0, max_abs_logit)


# ------------------------------------------------------------------------------------------- the refusal
def test_this_cpu_passes_the_bf16_check_when_it_has_bf16_instructions():
    from passk_rl.config import config_from_dict, cpu_bf16_problem, installation_problems

    if torch.cpu._is_avx512_bf16_supported():
        assert cpu_bf16_problem() is None
        assert installation_problems(config_from_dict({"model": {"dtype": "bfloat16"},
                                                       "sync": {"transport": "shm_safetensors"}})) == []
    # float32 is never asked about
    assert installation_problems(config_from_dict({"sync": {"transport": "shm_safetensors"}})) == []


def test_a_cpu_without_bf16_is_refused_before_any_actor_starts(monkeypatch, tmp_path, capsys):
    """The launch path with the capability check answering as it would on a CPU whose bf16 kernels fail: exit 2,
    the reason named, and no Ray cluster, engine or learner started."""
    import ray

    import passk_rl.config as config
    from passk_rl.launch import main

    reason = "torch 2.x has no working bfloat16 kernels here (RuntimeError: \"addmm\" not implemented for 'BFloat16')"
    monkeypatch.setattr(config, "cpu_bf16_problem", lambda: reason)
    rc = main(["--config", "configs/tiny_cpu.yaml", "model.dtype=bfloat16", f"run.output_dir={tmp_path}", "run.name=bf16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.dtype: 'bfloat16' cannot run on this CPU: " + reason + "; use float32" in err
    assert not ray.is_initialized() and not (tmp_path / "bf16").exists()


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import ray

    from cluster.ray_init import runtime_env

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    b = Bench(tmp_path_factory.mktemp("bf16"))
    try:
        yield b
    finally:
        b.close_learner()
        b.close_engines()
        ray.shutdown()


def _master_weights(learner):
    """(dtype of the module's parameters, dtype of the optimizer's master partitions) on every rank."""
    import ray

    def look(actor):
        w = actor.worker
        opt = w.engine.optimizer
        masters = (getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
                   or getattr(opt, "single_partition_of_fp32_groups", None))  # ZeRO-1/2
        return ({str(p.dtype) for p in w.module.parameters()}, {str(t.dtype) for t in masters})

    return ray.get([a.__ray_call__.remote(look) for a in learner.actors])


@pytest.mark.e2e
@pytest.mark.slow
def test_bf16_generate_train_stream_probe(bench):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.transports import WeightSync
    from cluster.weight_sync import checkpoint_params

    t0 = time.perf_counter()
    arch = "qwen2_untied"
    path = bench.model(arch)
    tok = AutoTokenizer.from_pretrained(path)
    probe = {"prompt_token_ids": tok("The quick brown fox ", add_special_tokens=False)["input_ids"],
             "response_token_ids": tok("jumps over the lazy dog.", add_special_tokens=False)["input_ids"]}
    pool = bench.engines(arch, dtype="bfloat16")
    learner = bench.learner_group(arch, 3, bf16=True)
    assert _master_weights(learner) == [({"torch.bfloat16"}, {"torch.float32"})] * 2

    # generate in bf16; the learner scores the samples (the PPO ratio's two sides)
    groups = pool.generate(["12+7=", "The cat "], n=2, max_tokens=8, seed=1)
    batch = [{"prompt_token_ids": s.prompt_token_ids, "response_token_ids": s.token_ids, "advantage": a}
             for g in groups for s, a in zip(g, (1.0, -1.0))]
    behaviour = [torch.tensor(s.logprobs) for g in groups for s in g]
    learner_lp = [torch.tensor(x) for x in learner.compute_logprobs(batch, temperature=1.0)]
    ratio_err = max((a - b).abs().max().item() for a, b in zip(behaviour, learner_lp))

    def tolerance():
        # max|z| on the probe, from the learner's own (bf16) weights evaluated in float32
        sd = learner.gather_state_dict()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf.load_state_dict(sd)
        with torch.no_grad():
            z = hf(torch.tensor([probe["prompt_token_ids"] + probe["response_token_ids"]])).logits
        return bf16_tolerance(z.abs().max().item()), z.abs().max().item()

    tol0, _ = tolerance()
    assert ratio_err < tol0, f"bf16 behaviour logprobs differ from the learner's by {ratio_err:.3g} (tol {tol0:.3g})"

    learner.train_step(batch, step=1)
    tol, max_logit = tolerance()
    want = torch.tensor(learner.compute_logprobs([probe], temperature=1.0)[0])
    before = max((g - want).abs().max().item() for g in engine_logprobs(pool, probe))
    assert before > tol, f"one bf16 step at lr 1e-2 did not move the probe past the tolerance ({before:.3g})"
    set_engine_transport(pool, bench.coll)
    sync = WeightSync(learner, pool, bench.coll, host="127.0.0.1")
    report = sync.sync(1)
    nbytes = sum(torch.Size(s).numel() * 2 for s in checkpoint_params(path).values())
    assert report["bytes"] == nbytes, "the stream is not bf16 (2 bytes a value)"
    after = max((g - want).abs().max().item() for g in engine_logprobs(pool, probe))
    assert after < tol, f"bf16 probe {after:.3g} above the tolerance {tol:.3g}"

    name = tamper_target(arch)
    tamper(learner, name, scale=1.0)
    tampered_want = torch.tensor(learner.compute_logprobs([probe], temperature=1.0)[0])
    tampered = max((g - tampered_want).abs().max().item() for g in engine_logprobs(pool, probe))
    assert tampered > tol, f"perturbing {name} went unnoticed at the bf16 tolerance ({tampered:.3g} <= {tol:.3g})"
    sync.sync(2)
    repaired = max((g - tampered_want).abs().max().item() for g in engine_logprobs(pool, probe))
    assert repaired < tol
    print(f"[bf16] max|z| {max_logit:.2f} tol {tol:.3g}; behaviour-vs-learner {ratio_err:.3g}; before {before:.3g} "
          f"after {after:.3g} tampered {tampered:.3g} repaired {repaired:.3g}; {time.perf_counter() - t0:.0f}s")
