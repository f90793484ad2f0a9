"""Unit tests for passk_rl.losses (pure torch)."""

import math

import pytest
import torch

from passk_rl.losses import (AGGREGATIONS, aggregate, kl_penalty, policy_loss, token_entropy, token_logprobs)


def _random_batch(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    lens[0] = T  # at least one full-length row
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()
    values = torch.randn(B, T, generator=g)
    values[mask == 0] = float("nan")  # padding must never leak
    return values, mask, lens


def _loop_aggregate(values, mask, mode, *, max_len=None):
    B, T = values.shape
    n_tok = sum(int(mask[i, t]) for i in range(B) for t in range(T))
    total = 0.0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if mask[i, t]:
                s += float(values[i, t])
                n += 1
        if mode == "seq_mean_token_sum":
            total += s / B
        elif mode == "token_mean":
            total += s / n_tok
        elif mode == "seq_mean_token_mean":
            total += (s / n if n else 0.0) / B
        elif mode == "seq_mean_token_sum_norm":
            total += s / (B * (T if max_len is None else max_len))
    return total


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_loop(mode, seed):
    values, mask, _ = _random_batch(seed)
    got = aggregate(values, mask, mode=mode)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_loop_aggregate(values, mask, mode), rel=1e-5, abs=1e-6)
    if mode == "seq_mean_token_sum_norm":
        got = aggregate(values, mask, mode=mode, max_len=32)
        assert got.item() == pytest.approx(_loop_aggregate(values, mask, mode, max_len=32), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_parts_sum_to_full_with_global_denominators(mode):
    """Micro-batching / data-parallel exactness: parts with global denominators add up to the full loss."""
    values, mask, lens = _random_batch(3, B=6, T=9)
    full = aggregate(values, mask, mode=mode)
    B, T = values.shape
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = 0.0
    for sl in parts:
        # each part is re-padded to its own width, as the learner does per micro-batch
        w = max(int(lens[sl].max()), 1)
        total += aggregate(values[sl, :w], mask[sl, :w], mode=mode, num_seqs=B, num_tokens=float(mask.sum()),
                           max_len=T).item()
    assert total == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


def test_token_mean_is_rescaled_seq_sum():
    values, mask, _ = _random_batch(4)
    B = values.shape[0]
    a = aggregate(values, mask, mode="token_mean")
    b = aggregate(values, mask, mode="seq_mean_token_sum")
    assert a.item() == pytest.approx(b.item() * B / mask.sum().item(), rel=1e-5)


def test_aggregate_degenerate_and_bad_input():
    v = torch.zeros(2, 3)
    m = torch.zeros(2, 3)
    for mode in AGGREGATIONS:
        assert aggregate(v, m, mode=mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        aggregate(v, m, mode="sum")
    with pytest.raises(ValueError, match="must both be"):
        aggregate(v, m[:, :2])


class _TinyLM(torch.nn.Module):
    """A small causal LM (embedding → causal running mean → MLP → vocab) for exact gradient checks."""

    def __init__(self, V=11, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, V))

    def forward(self, ids):
        e = self.emb(ids)
        csum = e.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.mlp(csum)


def _seq_logprob(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(ids)[0]
    lp = torch.log_softmax(logits, -1)
    P = len(prompt)
    return sum(lp[P - 1 + t, response[t]] for t in range(len(response)))


def test_gradient_at_ratio_one_is_mean_convention():
    model = _TinyLM()
    g = torch.Generator().manual_seed(0)
    prompt = [1, 2, 3]
    responses = [[4, 5], [6, 7, 8, 9], [10], [3, 3, 3]]
    adv = torch.tensor([0.7, -1.3, 2.0, 0.25])
    B = len(responses)

    # direct: −(1/B) Σ A_i ∇ log π(y_i)
    model.zero_grad()
    direct = -sum(adv[i] * _seq_logprob(model, prompt, responses[i]) for i in range(B)) / B
    direct.backward()
    want = [p.grad.clone() for p in model.parameters()]

    # batched through policy_loss (right padding, gather of response positions)
    T = max(len(r) for r in responses)
    ids = torch.zeros(B, len(prompt) + T, dtype=torch.long)
    tgt = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    for i, r in enumerate(responses):
        ids[i, :len(prompt) + len(r)] = torch.tensor(prompt + r)
        tgt[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    model.zero_grad()
    logits = model(ids)[:, len(prompt) - 1:len(prompt) - 1 + T]
    lp = token_logprobs(logits, tgt)
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    assert metrics["pg_clipfrac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    # loss value at ratio 1 is −(1/B) Σ_i A_i T_i
    lens = mask.sum(1)
    assert loss.item() == pytest.approx(-(adv * lens).sum().item() / B, rel=1e-6)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert any(w.abs().max() > 1e-4 for w in want)


def test_clipping_zeroes_gradient_outside_trust_region():
    old = torch.zeros(1, 4)
    # log-ratios: inside, above 1+eps, below 1-eps, inside
    lp = torch.tensor([[0.05, 0.5, -0.5, -0.05]], requires_grad=True)
    mask = torch.ones(1, 4)

    for sign in (+1.0, -1.0):
        lp.grad = None
        loss, m = policy_loss(lp, old, torch.tensor([sign]), mask, clip_low=0.2, clip_high=0.2)
        loss.backward()
        grad = lp.grad[0]
        assert grad[0] != 0 and grad[3] != 0
        if sign > 0:  # A>0: ratio > 1+eps clipped (no grad), ratio < 1-eps still pushed up
            assert grad[1] == 0 and grad[2] != 0
        else:  # A<0: ratio < 1-eps clipped, ratio > 1+eps still pushed down
            assert grad[2] == 0 and grad[1] != 0
        assert m["pg_clipfrac"].item() == pytest.approx(0.25)
        assert m["ratio_max"].item() == pytest.approx(math.exp(0.5), rel=1e-6)
        assert m["ratio_min"].item() == pytest.approx(math.exp(-0.5), rel=1e-6)

    # asymmetric clip-higher: with clip_high = 1.0 the 0.5 log-ratio (r=1.65) is inside for A>0
    lp.grad = None
    loss, m = policy_loss(lp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=1.0)
    loss.backward()
    assert lp.grad[0, 1] != 0 and m["pg_clipfrac"].item() == 0.0


def test_dual_clip_bounds_negative_advantage_tokens():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[math.log(5.0), math.log(2.0)]], requires_grad=True)  # ratios 5 and 2
    mask = torch.ones(1, 2)
    loss, m = policy_loss(lp, old, torch.tensor([-1.0]), mask, dual_clip=3.0)
    loss.backward()
    # token 0: −A·r = 5 > c·|A| = 3 → bounded at 3, no gradient; token 1: 2 < 3 → unchanged, has gradient
    assert loss.item() == pytest.approx(3.0 + 2.0)
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0
    assert m["pg_clipfrac_lower"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, torch.tensor([-1.0]), mask, dual_clip=0.5)


def test_policy_loss_shapes_and_advantage_broadcast():
    lp = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    a = torch.tensor([1.0, -2.0, 0.5])
    l1, _ = policy_loss(lp, lp, a, mask)
    l2, _ = policy_loss(lp, lp, a[:, None].expand(3, 4), mask)
    assert l1.item() == pytest.approx(l2.item())
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, lp, torch.ones(4), mask)
    with pytest.raises(ValueError, match="same"):
        policy_loss(lp, lp[:, :3], a, mask)


def test_approx_kl_metric_nonnegative_and_zero_on_policy():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    _, m0 = policy_loss(lp, lp, torch.ones(4), mask)
    assert m0["approx_kl"].item() == 0.0
    _, m1 = policy_loss(lp, lp + 0.3 * torch.randn(4, 6, generator=g), torch.ones(4), mask)
    assert m1["approx_kl"].item() > 0.0


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_zero_at_equality(est):
    lp = torch.randn(3, 5, requires_grad=True)
    mask = torch.ones(3, 5)
    kl = kl_penalty(lp, lp.detach(), mask, estimator=est)
    assert kl.abs().max().item() == 0.0
    if est != "k1":  # k2/k3 have a minimum at equality → zero gradient there
        kl.sum().backward()
        assert lp.grad.abs().max().item() < 1e-7


def test_kl_estimators_signs_and_values():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(50, 8, generator=g)
    ref = lp + torch.randn(50, 8, generator=g)
    mask = (torch.rand(50, 8, generator=g) > 0.3).float()
    k3 = kl_penalty(lp, ref, mask, estimator="k3")
    k2 = kl_penalty(lp, ref, mask, estimator="k2")
    k1 = kl_penalty(lp, ref, mask, estimator="k1")
    assert (k3 >= 0).all() and (k2 >= 0).all()
    assert (k1 < 0).any()  # k1 is unbiased but not pointwise non-negative
    d = ref - lp
    torch.testing.assert_close(k3, (torch.exp(d) - d - 1) * mask)
    torch.testing.assert_close(k2, 0.5 * d * d * mask)
    torch.testing.assert_close(k1, -d * mask)
    assert (k3[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, mask, estimator="k4")


def test_k3_is_unbiased_for_kl_between_categoricals():
    """E_{y~π}[k3] = KL(π‖π_ref): check exactly by summing over the support."""
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(10, generator=g), -1)
    logr = torch.log_softmax(torch.randn(10, generator=g), -1)
    k3 = kl_penalty(logp[None], logr[None], torch.ones(1, 10), estimator="k3")[0]
    expected = (logp.exp() * k3).sum()
    true_kl = (logp.exp() * (logp - logr)).sum()
    assert expected.item() == pytest.approx(true_kl.item(), rel=1e-5)


def test_token_logprobs_stable_and_matches_log_softmax():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 17, generator=g) * 3
    tok = torch.randint(0, 17, (2, 3), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tok), want)
    want_t = torch.log_softmax(logits / 0.7, -1).gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tok, temperature=0.7), want_t)
    big = logits * 1e4  # naive exp would overflow
    out = token_logprobs(big.bfloat16(), tok)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out <= 0).all()
    ent = token_entropy(logits)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * torch.log(p)).sum(-1))
    with pytest.raises(ValueError, match="does not match"):
        token_logprobs(logits, tok[:, :2])


# ---------------------------------------------------------------------------- reference penalty: JS (issue 20)


def _js_exact(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def test_js_penalty_value_and_gradient_match_direct_computation():
    from passk_rl.losses import js_penalty

    g = torch.Generator().manual_seed(0)
    lp = (-4 * torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = lp.detach() + torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    js = js_penalty(lp, ref, mask)
    # value: the JS generator f(u) = ½[u log u − (u+1) log((u+1)/2)] at u = π_ref/π_θ, from the probabilities
    u = (ref - lp.detach()).exp()
    want = 0.5 * (u * u.log() - (u + 1) * ((u + 1) / 2).log())
    torch.testing.assert_close(js.detach(), torch.where(mask.bool(), want, torch.zeros_like(want)), rtol=1e-12,
                               atol=1e-12)
    assert (js.detach() >= 0).all() and float(js_penalty(ref, ref, mask).abs().max()) < 1e-15
    # gradient per token: ½ log(2π_θ / (π_θ + π_ref)) = ½ log(π_θ / m)
    js.sum().backward()
    p, q = lp.detach().exp(), ref.exp()
    want_g = 0.5 * (2 * p / (p + q)).log()
    torch.testing.assert_close(lp.grad, torch.where(mask.bool(), want_g, torch.zeros_like(want_g)), rtol=1e-12,
                               atol=1e-12)


def test_js_penalty_is_unbiased_for_js_and_its_gradient_between_categoricals():
    """Over a categorical π_θ = softmax(θ): E_{y∼π_θ}[J(y)] = JS(π_θ, π_ref) and E_{y∼π_θ}[∂J(y)/∂θ] = ∇_θ JS."""
    from passk_rl.losses import js_penalty

    g = torch.Generator().manual_seed(1)
    theta = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    exact = _js_exact(torch.softmax(theta, -1), q)
    (grad_exact,) = torch.autograd.grad(exact, theta)
    logp = torch.log_softmax(theta, -1)
    per_token = js_penalty(logp[None, :], q.log()[None, :], torch.ones(1, 7))[0]  # J at every possible token
    p = logp.detach().exp()
    assert float((p * per_token.detach()).sum()) == pytest.approx(float(exact), rel=1e-12)
    (grad_est,) = torch.autograd.grad((p * per_token).sum(), theta)  # Σ_y π(y) ∂J(y)/∂θ (weights held fixed)
    torch.testing.assert_close(grad_est, grad_exact, rtol=1e-10, atol=1e-12)


def test_ref_penalty_dispatch_and_learner_loss_adds_it():
    from passk_rl.losses import LossOptions, js_penalty, learner_loss, ref_penalty

    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(2, 4, generator=g)
    ref = lp - 0.3 * torch.rand(2, 4, generator=g)
    mask = torch.ones(2, 4)
    torch.testing.assert_close(ref_penalty(lp, ref, mask, kind="js"), js_penalty(lp, ref, mask))
    torch.testing.assert_close(ref_penalty(lp, ref, mask, kind="kl", estimator="k2"),
                               kl_penalty(lp, ref, mask, estimator="k2"))
    with pytest.raises(ValueError, match="unknown ref_penalty"):
        ref_penalty(lp, ref, mask, kind="fkl")
    adv = torch.tensor([1.0, -0.5])
    denoms = dict(num_seqs=2.0, num_tokens=8.0, max_len=4.0)
    for kind in ("kl", "js"):
        opts = LossOptions(kl_coef=0.3, ref_penalty=kind)
        total, pg, term, m = learner_loss(lp, lp, adv, mask, opts=opts, ref_logprobs=ref, **denoms)
        assert float(term) > 0
        assert float(total) == pytest.approx(float(pg) + 0.3 * float(term))
        assert float(m["ref_sum"]) == pytest.approx(float(ref_penalty(lp, ref, mask, kind=kind).sum()))
    with pytest.raises(ValueError, match="unknown ref_penalty 'x'"):
        LossOptions(ref_penalty="x")
    from actors.learner_engine import LearnerOptions  # the learner checks the config's bound, naming the key

    with pytest.raises(ValueError, match="learner.is_cap: invalid value 1.0"):
        LearnerOptions.from_flat(is_cap=1.0)


def test_token_logprobs_and_entropy_share_one_pass_and_match_the_separate_ones():
    from passk_rl.losses import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 50, generator=g) * 4
    tokens = torch.randint(0, 50, (3, 6), generator=g)
    for T in (1.0, 0.7):
        lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=T)
        torch.testing.assert_close(lp, token_logprobs(logits, tokens, temperature=T), rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, token_entropy(logits, temperature=T), rtol=0, atol=1e-5)
        assert not ent.requires_grad
    lp, ent = token_logprobs_and_entropy(logits, tokens, entropy=False)
    assert ent is None
