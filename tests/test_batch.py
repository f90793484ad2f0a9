"""The columnar batch path (passk_rl/batch.py → collate → passk_rl/losses.learner_loss) against a straightforward
per-sample reference: every sequence run unpadded on its own, importance weights one token at a time, the loss
built from per-sample rows. Same loss and gradients to 1e-6 (pure torch: no Ray, no DeepSpeed; the real ZeRO ranks
are checked against a reference in test_learner.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from passk_rl.batch import Batch, collate, shard_by_tokens
from passk_rl.losses import LossOptions, aggregate, importance_weights, learner_loss, policy_loss, ref_penalty, \
    token_logprobs, token_logprobs_and_entropy

MODEL = Path(__file__).resolve().parents[1] / "passk_rl" / "models" / "arith-base"


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # float64 weights: the padded batched forward and the unpadded one then agree far below the 1e-6 compared
    # (in float32 their summation orders alone differ by ~1e-6 of the gradient's scale)
    policy = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float64)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # a reference that differs, so the penalty and its gradient are not zero
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, ref


def _samples(policy, seed, n=11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(0, 20, (1,), generator=g))
        prompt = torch.randint(3, 100, (P,), generator=g).tolist()
        resp = torch.randint(3, 100, (R,), generator=g).tolist()
        with torch.no_grad():
            true = _row_logprobs(policy, prompt, resp)
        mu = None if i % 4 == 1 else (true + 0.4 * torch.randn(R, generator=g)).tolist()
        out.append({"prompt_token_ids": prompt, "response_token_ids": resp, "behaviour_logprobs": mu,
                    "advantage": float(torch.randn((), generator=g))})
    return out


def _row_logprobs(model, prompt, resp, temperature=1.0):
    if not resp:
        return torch.zeros(0)
    logits = model(input_ids=torch.tensor([prompt + resp])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(resp)]
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]


def _pad(rows, fill=0.0):
    T = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), T), fill)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = r if torch.is_tensor(r) else torch.tensor(r, dtype=torch.float32)
            mask[i, :len(r)] = 1
    return out, mask


def reference_loss(policy, ref, samples, opts: LossOptions):
    """The pre-columnar learner, written out per sample."""
    T = opts.temperature
    rows = [_row_logprobs(policy, s["prompt_token_ids"], s["response_token_ids"], T) for s in samples]
    lp, mask = _pad(rows)
    old_rows, w_rows = [], []
    for s, row in zip(samples, rows):
        mu = s["behaviour_logprobs"]
        if opts.off_policy == "none":
            old_rows.append(row.detach() if mu is None else torch.tensor(mu))
            w_rows.append([1.0] * len(row))
            continue
        prox = [float(x) for x in row.detach()]
        w = [1.0] * len(prox) if mu is None else [math.exp(max(min(a - b, 20.0), -20.0)) for a, b in zip(prox, mu)]
        if opts.off_policy == "tis":
            w = [min(x, opts.is_cap) for x in w]
        old_rows.append(torch.tensor(prox))
        w_rows.append(w)
    old, _ = _pad(old_rows)
    isw, _ = _pad(w_rows, fill=1.0)
    adv = torch.tensor([s["advantage"] for s in samples], dtype=torch.float32)
    max_len = float(opts.max_response_len) if opts.max_response_len else None
    loss, _ = policy_loss(lp, old, adv, mask, clip_low=opts.clip_low, clip_high=opts.clip_high,
                          dual_clip=opts.dual_clip, aggregation=opts.aggregation, max_len=max_len,
                          is_weights=isw if opts.off_policy != "none" else None)
    if opts.kl_coef:
        with torch.no_grad():
            ref_lp, _ = _pad([_row_logprobs(ref, s["prompt_token_ids"], s["response_token_ids"], T) for s in samples])
        pen = ref_penalty(lp, ref_lp, mask, kind=opts.ref_penalty, estimator=opts.kl_estimator)
        loss = loss + opts.kl_coef * aggregate(pen, mask, mode=opts.aggregation, max_len=max_len)
    return loss


def columnar_loss(policy, ref, samples, opts: LossOptions, *, micro_batch_size=3, pad_id=0):
    """What a learner rank does: columns, vectorised weights, sorted micro-batches, padded collate, global
    denominators; returns the summed loss (gradients accumulated in ``policy``)."""
    batch = Batch.from_samples(samples)
    R = batch.response_lens
    denoms = dict(num_seqs=float(len(batch)), num_tokens=float(R.sum()),
                  max_len=float(opts.max_response_len or R.max()))

    def logits_of(model, c):
        out = model(input_ids=c.ids, attention_mask=c.attn).logits
        return out.gather(1, c.pos.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    if opts.off_policy != "none":
        with torch.no_grad():
            prox = np.concatenate([token_logprobs(logits_of(policy, c), c.tgt, temperature=opts.temperature)[
                c.mask.bool()].numpy() for c in [collate(batch.select([i]), pad_id=pad_id) for i in range(len(batch))]])
        has = torch.from_numpy(np.repeat(batch.has_behaviour, R))
        w = importance_weights(torch.from_numpy(prox), torch.from_numpy(batch.behaviour_logprobs),
                               mode=opts.off_policy, cap=opts.is_cap, has_behaviour=has)
        batch.behaviour_logprobs, batch.is_weights = prox.astype(np.float32), w.float().numpy()
        batch.has_behaviour = np.ones(len(batch), bool)
    order = np.argsort(batch.sizes(), kind="stable")
    total = 0.0
    for j in range(0, len(order), micro_batch_size):
        c = collate(batch.select(order[j:j + micro_batch_size]), pad_id=pad_id)
        ref_lp = None
        if opts.kl_coef:
            with torch.no_grad():
                ref_lp = token_logprobs(logits_of(ref, c), c.tgt, temperature=opts.temperature)
        lp, _ = token_logprobs_and_entropy(logits_of(policy, c), c.tgt, temperature=opts.temperature)
        old = torch.where(c.has_old[:, None], c.old, lp.detach())
        loss, _, _, _ = learner_loss(lp, old, c.adv, c.mask, opts=opts, is_weights=c.isw, ref_logprobs=ref_lp,
                                     **denoms)
        loss.backward()
        total += float(loss.detach())
    # a placeholder micro-batch (a rank with fewer micro-batches) adds exactly nothing
    c = collate(Batch.dummy(pad_id), pad_id=pad_id, real=False)
    lp, _ = token_logprobs_and_entropy(logits_of(policy, c), c.tgt)
    loss, _, _, _ = learner_loss(lp, lp.detach(), c.adv, c.mask, opts=opts, is_weights=c.isw,
                                 ref_logprobs=lp.detach() if opts.kl_coef else None, **denoms)
    assert float(loss.detach()) == 0.0
    loss.backward()
    return total


CASES = {
    "default": LossOptions(),
    "token_mean_clip_higher": LossOptions(aggregation="token_mean", clip_high=0.28),
    "seq_mean_token_mean_dual_clip_T07": LossOptions(aggregation="seq_mean_token_mean", dual_clip=3.0,
                                                     temperature=0.7),
    "norm_kl_k3": LossOptions(aggregation="seq_mean_token_sum_norm", max_response_len=24, kl_coef=0.1),
    "tis_js": LossOptions(off_policy="tis", is_cap=1.5, kl_coef=0.2, ref_penalty="js"),
    "decoupled_ppo_k2": LossOptions(off_policy="decoupled_ppo", aggregation="token_mean", kl_coef=0.05,
                                    kl_estimator="k2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_columnar_path_gives_the_per_sample_loss_and_gradient(models, case):
    policy, ref = models
    opts = CASES[case]
    samples = _samples(policy, seed=len(case))
    policy.zero_grad()
    want = reference_loss(policy, ref, samples, opts)
    want.backward()
    want_g = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    got = columnar_loss(policy, ref, samples, opts)
    assert got == pytest.approx(float(want), rel=1e-6, abs=1e-6)
    scale = max(float(g.abs().max()) for g in want_g.values())
    worst = max(float((p.grad - want_g[n]).abs().max()) for n, p in policy.named_parameters())
    assert scale > 1e-3  # a real gradient, not zeros compared with zeros
    assert worst <= 1e-6 * max(1.0, scale), (worst, scale)


def test_collate_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(7):
        P, R = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
        samples.append({"prompt_token_ids": torch.randint(1, 50, (P,), generator=g).tolist(),
                        "response_token_ids": torch.randint(1, 50, (R,), generator=g).tolist(),
                        "behaviour_logprobs": None if i == 2 else (-torch.rand(R, generator=g)).tolist(),
                        "advantage": float(i) - 3})
    b = Batch.from_samples(samples)
    b.is_weights = np.linspace(0.5, 1.5, int(b.response_lens.sum())).astype(np.float32)
    c = collate(b, pad_id=99)
    L = max(len(s["prompt_token_ids"]) + len(s["response_token_ids"]) for s in samples)
    T = max(len(s["response_token_ids"]) for s in samples)
    assert c.ids.shape == (7, L) and c.tgt.shape == c.mask.shape == c.old.shape == c.pos.shape == (7, T)
    r0 = 0
    for i, s in enumerate(samples):
        p, r = s["prompt_token_ids"], s["response_token_ids"]
        P, R = len(p), len(r)
        assert c.ids[i].tolist() == p + r + [99] * (L - P - R)
        assert c.attn[i].tolist() == [1] * (P + R) + [0] * (L - P - R)
        assert c.tgt[i].tolist() == r + [99] * (T - R)
        assert c.mask[i].tolist() == [1.0] * R + [0.0] * (T - R)
        assert c.pos[i].tolist() == [min(P - 1 + t, P + R - 1) for t in range(T)]
        assert c.has_old[i] == (s["behaviour_logprobs"] is not None)
        if s["behaviour_logprobs"] is not None:
            assert c.old[i, :R].tolist() == pytest.approx(s["behaviour_logprobs"])
        assert c.isw[i].tolist() == pytest.approx(b.is_weights[r0:r0 + R].tolist() + [1.0] * (T - R))
        assert float(c.adv[i]) == s["advantage"]
        r0 += R
    dummy = collate(Batch.dummy(7), pad_id=7, real=False)
    assert float(dummy.mask.sum()) == 0 and float(dummy.adv.abs().sum()) == 0


def test_importance_weights_match_the_token_loop():
    g = torch.Generator().manual_seed(5)
    lp = -3 * torch.rand(200, generator=g)
    mu = lp + torch.randn(200, generator=g) * 2
    mu[:3] = lp[:3] - 50.0  # beyond the clamp
    has = torch.rand(200, generator=g) > 0.2
    for mode in ("tis", "decoupled_ppo"):
        w = importance_weights(lp, mu, mode=mode, cap=1.7, has_behaviour=has)
        for i in range(200):
            want = math.exp(max(min(float(lp[i]) - float(mu[i]), 20.0), -20.0)) if has[i] else 1.0
            if mode == "tis":
                want = min(want, 1.7)
            assert float(w[i]) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="'tis' or 'decoupled_ppo'"):
        importance_weights(lp, mu, mode="none", cap=2.0)


def test_shard_by_tokens_on_columns_is_balanced_and_covers():
    rng = np.random.default_rng(0)
    samples = [{"prompt_token_ids": [1] * int(rng.integers(1, 30)), "response_token_ids": [2] * int(rng.integers(0, 200)),
                "advantage": 0.0} for _ in range(301)]
    b = Batch.from_samples(samples)
    shards = shard_by_tokens(b, 4)
    assert sorted(i for s in shards for i in s) == list(range(301))
    loads = [int(b.sizes()[s].sum()) for s in shards]
    assert max(loads) - min(loads) <= int(b.sizes().max())


def test_rollout_batch_is_prompt_major_with_each_samples_advantage():
    from actors.generator import Sample
    from passk_rl.rollout import Rollout

    groups = [[Sample(prompt_token_ids=[1, 2 + g], token_ids=list(range(10 * g + j, 10 * g + j + j)), text="",
                      logprobs=[-0.5 - j] * j, finish_reason="stop") for j in range(3)] for g in range(2)]
    rewards = np.zeros((2, 3))
    ro = Rollout(step=1, prompts=[], samples=groups, verdicts=[], status_counts={}, rewards=rewards,
                 truncated=rewards.astype(bool), weights_version=0, order_before=(), generate_seconds=0.0,
                 verify_seconds=0.0)
    adv = np.arange(6, dtype=np.float64).reshape(2, 3) - 2.5
    b = ro.learner_batch(adv)
    assert len(b) == 6
    for g in range(2):
        for j in range(3):
            row = b[3 * g + j]
            assert row["prompt_token_ids"] == [1, 2 + g] and row["response_token_ids"] == groups[g][j].token_ids
            assert row["behaviour_logprobs"] == pytest.approx(groups[g][j].logprobs)
            assert row["advantage"] == adv[g, j]
    with pytest.raises(ValueError, match=r"advantages have shape \(3, 2\)"):
        ro.learner_batch(adv.reshape(3, 2))
