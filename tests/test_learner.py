"""DeepSpeed ZeRO learner on real parts: 2 ranks as Ray actors over gloo, checked against plain torch.

Each ZeRO stage gets one LearnerGroup (module fixture) that first saves a checkpoint of its fresh state; tests
that need a fresh model/optimizer load it, which also exercises checkpoint loading.
"""

import copy
from pathlib import Path

import pytest
import torch

from actors.learner import LearnerGroup, shard_by_tokens
from passk_rl.batch import Batch
from passk_rl.losses import aggregate, kl_penalty, policy_loss
from tests.learner_helpers import loss_gradient

REPO = str(Path(__file__).resolve().parents[1])
# Adam's first step is lr·g/(|g|+eps): for coordinates with |g| ≈ eps it amplifies float-summation noise (the
# order of reductions differs between ZeRO and the reference) by lr/eps. eps = 1e-4 keeps that noise far below
# the tolerance while the step still moves every coordinate with a real gradient.
LR, WD, BETAS, EPS, CLIP = 1e-2, 0.1, (0.9, 0.95), 1e-4, 1.0
STAGE_KW = {
    # stage 2: the default aggregation (seq_mean_token_sum, the project's mean convention), asymmetric clip
    2: dict(zero_stage=2, aggregation="seq_mean_token_sum", clip_low=0.2, clip_high=0.28),
    # stage 3: every parameter really partitioned (tiny tensors would stay whole under the default threshold);
    # token_mean needs global token counts across micro-batches and ranks; frozen reference + KL in the loss
    3: dict(zero_stage=3, aggregation="token_mean", clip_low=0.2, clip_high=0.2, ref_model=True,
            kl_coef=0.05, kl_estimator="k3",
            ds_config_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}),
}


# ---------------------------------------------------------------------------- pure helpers


def test_shard_by_tokens_balances_and_covers():
    samples = [{"prompt_token_ids": [1] * p, "response_token_ids": [2] * r} for p, r in
               [(3, 10), (3, 1), (5, 2), (2, 8), (4, 4), (1, 1), (6, 0)]]
    shards = shard_by_tokens(samples, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(samples)))
    loads = [sum(len(samples[i]["prompt_token_ids"]) + len(samples[i]["response_token_ids"]) for i in s)
             for s in shards]
    assert max(loads) - min(loads) <= 13  # LPT bound: at most the largest item
    assert shard_by_tokens(samples[:1], 2) == [[0], []]


def test_validate_batch_errors_name_sample_and_key():
    good = {"prompt_token_ids": [1, 2], "response_token_ids": [3], "behaviour_logprobs": [-0.5], "advantage": 1.0}
    assert Batch.from_samples([good])[0]["behaviour_logprobs"] == [-0.5]
    with pytest.raises(ValueError, match=r"batch\[1\] is missing key 'advantage'"):
        Batch.from_samples([good, {"prompt_token_ids": [1], "response_token_ids": [2]}])
    with pytest.raises(ValueError, match=r"batch\[0\]: behaviour_logprobs has 2 entries but response_token_ids has 1"):
        Batch.from_samples([{**good, "behaviour_logprobs": [-1.0, -2.0]}])
    with pytest.raises(ValueError, match=r"batch\[1\]: prompt_token_ids is empty"):
        Batch.from_samples([good, {**good, "prompt_token_ids": []}])
    with pytest.raises(ValueError, match=r"batch\[1\]: advantage is not finite"):
        Batch.from_samples([good, {**good, "advantage": float("nan")}])
    with pytest.raises(ValueError, match=r"batch\[2\]: behaviour_logprobs contains NaN"):
        Batch.from_samples([good, good, {**good, "behaviour_logprobs": [float("nan")]}])
    with pytest.raises(ValueError, match="must be a Batch or a list"):
        Batch.from_samples({"prompt_token_ids": [1]})
    # columns that do not fit together are refused too (a batch built by hand or damaged in transit)
    b = Batch.from_samples([good, good])
    b.response_lens = b.response_lens + 1
    with pytest.raises(ValueError, match="tokens has 6 entries, the lengths add up to 8"):
        b.validate()


def test_batch_columns_round_trip_and_select():
    samples = [{"prompt_token_ids": [5, 6, 7], "response_token_ids": [8, 9], "behaviour_logprobs": [-0.1, -0.2],
                "advantage": 0.5},
               {"prompt_token_ids": [4], "response_token_ids": [], "behaviour_logprobs": [], "advantage": -1.0},
               {"prompt_token_ids": [1, 2], "response_token_ids": [3, 3, 3], "behaviour_logprobs": None,
                "advantage": 2.0}]
    b = Batch.from_samples(samples)
    assert len(b) == 3 and b.tokens.tolist() == [5, 6, 7, 8, 9, 4, 1, 2, 3, 3, 3]
    for i, s in enumerate(samples):
        got = b[i]
        assert got["prompt_token_ids"] == s["prompt_token_ids"] and got["response_token_ids"] == s["response_token_ids"]
        assert got["advantage"] == s["advantage"]
        want_lp = None if s["behaviour_logprobs"] is None else pytest.approx(s["behaviour_logprobs"])
        assert got["behaviour_logprobs"] == want_lp
    sub = b.select([2, 0])
    assert [sub[0]["response_token_ids"], sub[1]["response_token_ids"]] == [[3, 3, 3], [8, 9]]
    assert sub[1]["behaviour_logprobs"] == pytest.approx([-0.1, -0.2]) and sub[0]["behaviour_logprobs"] is None
    assert shard_by_tokens(b, 2) == shard_by_tokens(samples, 2)


# ---------------------------------------------------------------------------- torch reference


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _seq_logprobs(model, prompt, response):
    """Per-token logprobs of one unpadded sequence (independent of the learner's padding/gather code)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    P = len(prompt)
    lp = torch.log_softmax(logits[P - 1:P - 1 + len(response)], -1)
    return lp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def _padded(rows):
    T = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), T)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = r if torch.is_tensor(r) else torch.tensor(r)
            mask[i, :len(r)] = 1
    return out, mask


def reference_step(model_path, batch, *, aggregation, clip_low, clip_high, kl_coef=0.0, kl_estimator="k3",
                   **_):
    """One AdamW step on the full-batch loss in a single process, no DeepSpeed, no padding tricks."""
    model = _hf_model(model_path)
    ref = copy.deepcopy(model).requires_grad_(False) if kl_coef else None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    rows = [_seq_logprobs(model, s["prompt_token_ids"], s["response_token_ids"]) for s in batch]
    lp, mask = _padded(rows)
    old, _ = _padded([s["behaviour_logprobs"] for s in batch])
    adv = torch.tensor([s["advantage"] for s in batch])
    loss, m = policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation)
    if kl_coef:
        with torch.no_grad():
            ref_lp, _ = _padded([_seq_logprobs(ref, s["prompt_token_ids"], s["response_token_ids"]) for s in batch])
        loss = loss + kl_coef * aggregate(kl_penalty(lp, ref_lp, mask, estimator=kl_estimator), mask,
                                          mode=aggregation)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, float(norm), float(loss.detach()), m


def make_batch(model_path, *, seed, n=5, noise=0.3):
    """Samples of varied prompt/response lengths (one empty response); behaviour logprobs = true ± noise."""
    g = torch.Generator().manual_seed(seed)
    model = _hf_model(model_path)
    resp_lens = [3, 7, 1, 9, 0, 4, 6][:n]
    batch = []
    for i in range(n):
        prompt = torch.randint(4, 90, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(4, 90, (resp_lens[i],), generator=g).tolist()
        with torch.no_grad():
            true = _seq_logprobs(model, prompt, resp) if resp else torch.zeros(0)
        old = (true + noise * torch.randn(len(resp), generator=g)).tolist()
        batch.append({"prompt_token_ids": prompt, "response_token_ids": resp, "behaviour_logprobs": old,
                      "advantage": float(torch.randn((), generator=g))})
    return batch


# ---------------------------------------------------------------------------- Ray fixtures


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from passk_rl.models.tiny import build_random_model
    return str(build_random_model(tmp_path_factory.mktemp("tiny"), seed=0))


def _group(stage, model_path, tmp_path_factory):
    g = LearnerGroup(2, model_path, device="cpu", num_cpus_per_rank=0.5, micro_batch_size=2, lr=LR,
                     weight_decay=WD, betas=BETAS, eps=EPS, grad_clip=CLIP, seed=0, **STAGE_KW[stage])
    init_ckpt = str(tmp_path_factory.mktemp(f"z{stage}_init"))
    g.save_checkpoint(init_ckpt, step=0, client_state={"note": "fresh"})
    g.init_ckpt = init_ckpt
    return g


@pytest.fixture(scope="module")
def z2(ray_cluster, model_path, tmp_path_factory):
    g = _group(2, model_path, tmp_path_factory)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def z3(ray_cluster, model_path, tmp_path_factory):
    g = _group(3, model_path, tmp_path_factory)
    yield g
    g.shutdown()


def _fresh(group):
    state = group.load_checkpoint(group.init_ckpt)
    assert state["step"] == 0 and state["note"] == "fresh"


def _max_diff(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage", [2, 3])
def test_update_equals_single_process_full_batch_step(stage, request, model_path):
    group = request.getfixturevalue(f"z{stage}")
    _fresh(group)
    batch = make_batch(model_path, seed=stage)
    before = group.gather_state_dict()
    metrics = group.train_step(batch, step=1)
    after = group.gather_state_dict()
    want, ref_norm, ref_loss, ref_m = reference_step(model_path, batch, **STAGE_KW[stage])

    assert _max_diff(before, after) > 0.5 * LR  # parameters moved (Adam's first step is ~lr per coordinate)
    # grad_norm is sensitive to any wrong scale (e.g. a missing ×W or per-micro-batch normalisation) —
    # Adam's update alone would hide a uniform scale error
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(float(ref_m["pg_clipfrac"]), abs=1e-6)
    assert metrics["pg_clipfrac"] > 0  # the noisy behaviour logprobs do trigger clipping
    assert metrics["samples"] == len(batch)
    assert metrics["tokens"] == sum(len(s["response_token_ids"]) for s in batch)
    diff = _max_diff(after, want)
    assert diff < 1e-3 * LR, f"ZeRO-{stage} update differs from the reference by {diff:g}"


@pytest.mark.parametrize("stage", [2, 3])
def test_shaping_advantages_reach_the_loss_gradient(stage, request, model_path):
    """loss gradient of one group == −(1/n) Σ A_i ∇log π(y_i) with A = passk_rl.shaping.shape(...).

    Stage 2 runs the default seq_mean_token_sum (exactly the mean convention). Stage 3 runs token_mean, which
    is the same gradient × n/N (N = response tokens of the group), plus a KL term whose gradient is zero while
    the policy equals the reference (fresh state).
    """
    from passk_rl import shaping

    group = request.getfixturevalue(f"z{stage}")
    _fresh(group)
    g = torch.Generator().manual_seed(11)
    n = 6
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    prompt = torch.randint(4, 90, (5,), generator=g).tolist()
    responses = [torch.randint(4, 90, (int(L),), generator=g).tolist() for L in [2, 5, 3, 7, 1, 4]]
    scale = 1.0 if STAGE_KW[stage]["aggregation"] == "seq_mean_token_sum" else n / sum(map(len, responses))
    model = _hf_model(model_path)
    for name, k in [("pkpo_loo_minus_one", 4), ("passk_alpha", 4), ("grpo", 1)]:
        assert name in shaping.SHAPINGS
        adv = shaping.shape(name, rewards, k=k)[0]
        assert adv.shape == (n,)
        # on-policy (behaviour_logprobs=None → ratio 1)
        batch = [{"prompt_token_ids": prompt, "response_token_ids": r, "behaviour_logprobs": None,
                  "advantage": float(a)}
                 for r, a in zip(responses, adv)]
        got = loss_gradient(group, batch)
        model.zero_grad()
        direct = -sum(float(adv[i]) * _seq_logprobs(model, prompt, responses[i]).sum() for i in range(n)) / n
        direct.backward()
        assert set(got) == {pname for pname, _ in model.named_parameters()}
        for pname, p in model.named_parameters():
            torch.testing.assert_close(got[pname], p.grad * scale, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}/{pname}: {m}")
    # loss_gradient must not leave gradients behind: a following step still matches the reference
    batch = make_batch(model_path, seed=2)
    metrics = group.train_step(batch, step=1)
    want, ref_norm, _, _ = reference_step(model_path, batch, **STAGE_KW[stage])
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert _max_diff(group.gather_state_dict(), want) < 1e-3 * LR


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_restores_parameters_and_optimizer_state(stage, request, model_path, tmp_path):
    group = request.getfixturevalue(f"z{stage}")
    _fresh(group)
    b1, b2 = make_batch(model_path, seed=20), make_batch(model_path, seed=21)
    group.train_step(b1, step=1)
    group.save_checkpoint(str(tmp_path / "ck"), step=1, client_state={"phat": [0.5, 0.25]})
    sd1 = group.gather_state_dict()
    group.train_step(b2, step=2)
    sd2 = group.gather_state_dict()
    assert _max_diff(sd1, sd2) > 0

    state = group.load_checkpoint(str(tmp_path / "ck"))
    assert state["step"] == 1 and state["phat"] == [0.5, 0.25]
    assert _max_diff(group.gather_state_dict(), sd1) == 0.0
    # the same second step from the restored state lands on the same parameters only if Adam's moments and
    # step count were restored too (fresh moments would give a ~lr·sign(g) step instead)
    group.train_step(b2, step=2)
    assert _max_diff(group.gather_state_dict(), sd2) < 1e-6 * LR

    with pytest.raises(Exception, match="does not exist"):
        group.load_checkpoint(str(tmp_path / "nope"))


def test_export_hf_loads_in_transformers_with_identical_logprobs(z3, model_path, tmp_path):
    from transformers import AutoTokenizer

    _fresh(z3)
    batch = make_batch(model_path, seed=30)
    z3.train_step(batch, step=1)  # export something that differs from the initial model
    out = z3.export_hf(str(tmp_path / "hf"))
    exported = _hf_model(out)
    sd = z3.gather_state_dict()
    for k, v in exported.named_parameters():
        torch.testing.assert_close(v.detach(), sd[k], rtol=0, atol=0)
    learner_lp = z3.compute_logprobs(batch)
    initial = _hf_model(model_path)
    moved = 0.0
    for s, lp in zip(batch, learner_lp):
        if not s["response_token_ids"]:
            assert lp == []
            continue
        with torch.no_grad():
            hf = _seq_logprobs(exported, s["prompt_token_ids"], s["response_token_ids"])
            hf0 = _seq_logprobs(initial, s["prompt_token_ids"], s["response_token_ids"])
        torch.testing.assert_close(torch.tensor(lp), hf, rtol=0, atol=1e-5)
        moved = max(moved, float((hf - hf0).abs().max()))
    assert moved > 1e-3
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("2+2=4", add_special_tokens=False)["input_ids"]) == "2+2=4"
    assert (Path(out) / "model.safetensors").is_file() and (Path(out) / "config.json").is_file()


def test_kl_to_frozen_reference_zero_then_positive(z3, model_path):
    _fresh(z3)
    batch = make_batch(model_path, seed=40)
    m1 = z3.train_step(batch, step=1)
    assert m1["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert m1["kl_loss"] == pytest.approx(0.0, abs=1e-7)
    m2 = z3.train_step(batch, step=2)
    assert m2["kl"] > 1e-4 and m2["kl_loss"] > 0
    ref_lp = z3.compute_logprobs(batch, ref=True)
    init = _hf_model(model_path)
    for s, lp in zip(batch, ref_lp):
        if s["response_token_ids"]:
            with torch.no_grad():
                want = _seq_logprobs(init, s["prompt_token_ids"], s["response_token_ids"])
            torch.testing.assert_close(torch.tensor(lp), want, rtol=0, atol=1e-5)  # the reference stays frozen


def test_fewer_samples_than_ranks_still_exact(z2, model_path):
    """One sample, two ranks: rank 1 runs only a padding micro-batch (zero gradient, same collectives)."""
    _fresh(z2)
    batch = make_batch(model_path, seed=50)[3:4]
    metrics = z2.train_step(batch, step=1)
    want, ref_norm, _, _ = reference_step(model_path, batch, **STAGE_KW[2])
    assert metrics["samples"] == 1 and metrics["micro_batches"] == 1
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert _max_diff(z2.gather_state_dict(), want) < 1e-3 * LR


def test_publish_weights_through_shm_transport(z3, model_path, tmp_path):
    from safetensors.torch import load_file

    from cluster.transports import make_transport
    from cluster.weight_sync import WeightHandle

    _fresh(z3)
    z3.train_step(make_batch(model_path, seed=60), step=1)
    transport = make_transport("shm_safetensors", root=str(tmp_path / "shm"), run_name="t")
    handle = z3.publish_weights(transport, step=1)
    assert isinstance(handle, WeightHandle) and handle.step == 1
    published = load_file(str(Path(handle.location) / "model.safetensors"))
    sd = z3.gather_state_dict()
    assert set(published) == set(sd)
    for k, v in sd.items():
        assert published[k].dtype == torch.float32
        torch.testing.assert_close(published[k], v, rtol=0, atol=0)
    infos = z3.info()
    assert [i["rank"] for i in infos] == [0, 1] and all(i["zero_stage"] == 3 for i in infos)


def test_deepspeed_start_neither_builds_nor_waits_for_its_inference_comm_op(tmp_path):
    """DeepSpeed's CPU ``init_distributed`` JIT-builds ``deepspeed_shm_comm`` (used only by inference all-reduce)
    and waits on its build ``lock``; a rank killed mid-build once left that file and every later start on the
    machine hung. The learner's start must skip the op: with a stale ``lock`` planted where torch would build it,
    a real ``init_distributed`` (gloo, one rank) returns, and nothing is built there. Without the skip this
    process waits on the lock until the timeout below fails the test."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from actors.learner_engine import skip_deepspeed_inference_comm_op as skip; name = skip(); "
            "import deepspeed; deepspeed.init_distributed(dist_backend='gloo'); "
            "import torch.distributed as d; print('OP', name, 'WORLD', d.get_world_size())")
    ext_root = tmp_path / "torch_extensions"
    op_dir = ext_root / "deepspeed_shm_comm"  # under TORCH_EXTENSIONS_DIR torch builds right below it
    op_dir.mkdir(parents=True)
    (op_dir / "lock").touch()
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext_root), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OP deepspeed_shm_comm WORLD 1" in r.stdout, r.stdout
    assert "built successfully" not in r.stdout + r.stderr
    assert sorted(p.name for p in op_dir.iterdir()) == ["lock"]  # no build.ninja, no .so: nothing was built
