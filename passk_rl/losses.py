"""Policy-gradient losses for the learner: PPO-clipped surrogate, token aggregation modes, KL estimators.

Pure torch (no Ray / DeepSpeed): tensors and explicit keyword hyperparameters in, tensors out.

Shapes: ``B`` sequences (samples) × ``T`` response tokens (right-padded). ``mask`` (B, T) is 1 on real response
tokens and 0 on padding. ``advantages`` is per sample (B,) and broadcast over that sample's tokens, or (B, T).

Project convention (see docs on Pass@K shaping): a shaping's advantages A_i are meant to be used as
``(1/n) Σ_i A_i ∇log π(y_i)``; with ``log π(y_i) = Σ_t log π(y_it | y_i,<t)`` that is exactly the
``"seq_mean_token_sum"`` aggregation at ratio 1, which is therefore the default.

Aggregation modes (``x_it`` = per-token loss, ``T_i`` = response length of sample i, ``N = Σ_i T_i``)
and their bias relative to that convention:

- ``"seq_mean_token_sum"``  — (1/B) Σ_i Σ_t x_it.  Gradient at ratio 1 is −(1/B) Σ_i A_i ∇log π(y_i): the
  REINFORCE estimator of the shaping's objective with no length bias. Gradient scale grows with length
  (each token of a long sample counts fully), as it does for the sequence log-likelihood itself.
- ``"token_mean"`` (DAPO, arXiv 2503.14476) — Σ_i Σ_t x_it / N. Equal to seq_mean_token_sum × B/N, i.e. the same
  direction within a batch scaled by 1/(mean response length). The scale depends on the sampled lengths, so
  across batches long-answer batches take smaller steps (a mild, data-dependent bias of the step size).
- ``"seq_mean_token_mean"`` (GRPO, arXiv 2402.03300) — (1/B) Σ_i (1/T_i) Σ_t x_it. Sample i's gradient is
  divided by its own length: with A>0 short answers are pushed harder, with A<0 long wrong answers are punished
  less — the length bias Dr.GRPO (arXiv 2503.20783) identified. Not an unbiased estimate of the convention.
  A sample with T_i = 0 contributes 0 (it has no tokens to average).
- ``"seq_mean_token_sum_norm"`` (Dr.GRPO) — Σ_i Σ_t x_it / (B · T_max) = seq_mean_token_sum / T_max. Unbiased up
  to the constant 1/T_max when T_max is a constant (the generation budget); if T_max is taken from the batch the
  scale becomes data dependent.

All modes are sums over sequences once the denominators (B, N, T_max) are fixed, which is what makes exact
micro-batching and data parallelism possible: pass the *global* denominators (``num_seqs``, ``num_tokens``,
``max_len``) when the batch given is only a part of the full batch; the parts' losses then add up to the
full-batch loss.

The learner's whole per-micro-batch loss is :func:`learner_loss` (policy term, off-policy weights, reference
penalty) under one :class:`LossOptions`; :func:`importance_weights` is the off-policy correction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch

AGGREGATIONS = ("seq_mean_token_sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# The divergence to the frozen reference model that learner.kl_coef weighs (see ref_penalty).
REF_PENALTIES = ("kl", "js")
# How a batch sampled by an older policy μ is corrected: "none" (PPO ratio against μ's logprobs, as on-policy),
# "decoupled_ppo" (ratio and clip against the learner's own logprobs at the start of the update, π_old, times the
# importance weight π_old/μ per token) or "tis" (the same weight truncated at is_cap).
OFF_POLICY = ("none", "tis", "decoupled_ppo")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The learner's loss hyperparameters (the ``learner.*`` config fields of the same names)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    aggregation: str = "seq_mean_token_sum"
    # seq_mean_token_sum_norm's constant normaliser (Dr. GRPO); None: the batch's longest response
    max_response_len: Optional[int] = None
    temperature: float = 1.0  # the learner scores softmax(logits / temperature), as the sampler did
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    ref_penalty: str = "kl"
    off_policy: str = "none"
    is_cap: float = 2.0
    compute_entropy: bool = True

    def __post_init__(self):
        _check_mode(self.aggregation)
        for name, allowed in (("kl_estimator", KL_ESTIMATORS), ("ref_penalty", REF_PENALTIES),
                              ("off_policy", OFF_POLICY)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; allowed: {list(allowed)}")
        # Numeric bounds (clip_low/high, dual_clip, is_cap, kl_coef) are checked once, against config.BOUNDS, by the
        # config loader and by the learner's options (actors/learner_engine.py); the math core imports no config.
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; allowed: {list(AGGREGATIONS)}")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log π(tokens) under ``logits / temperature``: (..., V) logits, (...) int tokens → (...) float32.

    Computed as ``logit[token] − logsumexp(logits)`` in float32 (stable for bf16 logits and large vocabularies;
    never materialises a full log-softmax copy). ``temperature`` must match how the behaviour logprobs were
    produced (vLLM returns raw-logit logprobs by default, i.e. temperature 1).
    """
    return token_logprobs_and_entropy(logits, tokens, temperature=temperature, entropy=False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                               entropy: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`token_logprobs` and (``entropy=True``) :func:`token_entropy` from one logsumexp over the vocabulary:
    the entropy then costs one more exp-and-sum over the logits already in memory. The entropy is detached (a
    metric, never a loss term); None when not asked."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)} "
                         f"(expected logits = tokens.shape + (vocab,))")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    lse = torch.logsumexp(x, dim=-1)
    lp = x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return lp, None
    with torch.no_grad():
        xd, ld = x.detach(), lse.detach()
        ent = ld - (torch.exp(xd - ld.unsqueeze(-1)) * xd).sum(-1)
    return lp, ent


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution: (..., V) → (...) float32, H = logsumexp(z) − Σ softmax(z)·z."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    lse = torch.logsumexp(x, dim=-1)
    return lse - (torch.softmax(x, dim=-1) * x).sum(-1)


def aggregate(values: torch.Tensor, mask: torch.Tensor, *, mode: str = "seq_mean_token_sum",
              num_seqs: Optional[float] = None, num_tokens: Optional[float] = None,
              max_len: Optional[float] = None) -> torch.Tensor:
    """Reduce per-token values (B, T) to a scalar under an aggregation ``mode`` (see module docstring).

    ``num_seqs`` (default B), ``num_tokens`` (default mask.sum()) and ``max_len`` (default T) are the global
    denominators; pass them when ``values`` is one micro-batch / one rank's shard of a larger batch so the
    parts sum to the full-batch value. Degenerate: zero denominators give 0 (nothing to average), not NaN.
    Masked-out entries never contribute, even if they hold inf/NaN.
    """
    _check_mode(mode)
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    m = mask.to(values.dtype)
    # where() rather than multiply so NaN/inf in padding cannot leak into the sum.
    v = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    B, T = values.shape
    n_seq = float(B if num_seqs is None else num_seqs)
    if mode == "seq_mean_token_mean":
        lens = m.sum(-1)
        per_seq = v.sum(-1) / lens.clamp(min=1.0)
        return per_seq.sum() / n_seq if n_seq > 0 else per_seq.sum() * 0.0
    total = v.sum()
    if mode == "seq_mean_token_sum":
        denom = n_seq
    elif mode == "token_mean":
        denom = float(m.sum().item() if num_tokens is None else num_tokens)
    else:  # seq_mean_token_sum_norm
        denom = n_seq * float(T if max_len is None else max_len)
    return total / denom if denom > 0 else total * 0.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, aggregation: str = "seq_mean_token_sum",
                num_seqs: Optional[float] = None, num_tokens: Optional[float] = None,
                max_len: Optional[float] = None, log_ratio_clamp: float = 20.0,
                is_weights: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO-clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) with asymmetric clip (DAPO "clip-higher").

    r_it = exp(logprobs − old_logprobs);  x_it = max(−A_i r_it, −A_i clip(r_it, 1 − clip_low, 1 + clip_high)).
    With ``dual_clip = c > 1`` (Ye et al. 2020, arXiv 1912.09729) tokens with A < 0 are further bounded:
    x_it = min(x_it, −c·A_i), so a huge ratio on a negative-advantage token cannot dominate the loss.
    loss = aggregate(x, mask, mode=aggregation, num_seqs=…, num_tokens=…, max_len=…).

    Args: logprobs (B,T) with grad; old_logprobs (B,T) behaviour logprobs (no grad needed); advantages (B,) or
    (B,T); mask (B,T). ``log_ratio_clamp`` bounds |log r| before exp so a stale/garbage behaviour logprob cannot
    overflow (tokens outside the bound get zero gradient through the ratio). ``is_weights`` (B,T), optional,
    multiplies each token's term (off-policy correction: with ``old_logprobs`` the learner's own logprobs at the
    start of the update, w = π_old/μ for samples drawn from an older policy μ — decoupled PPO, Hilton et al.
    2021 / AReaL; truncated at a cap: TIS).

    At ratio 1 (logprobs == old_logprobs numerically) with "seq_mean_token_sum" the gradient is
    −(1/B) Σ_i A_i ∇log π(y_i), the project's mean convention.

    Returns (loss, metrics); metrics are detached 0-dim tensors, token means over ``mask`` of this batch:
    ``pg_clipfrac`` (share of tokens whose clipped branch is active → no gradient), ``pg_clipfrac_lower``
    (dual clip active), ``approx_kl`` (k3 estimate of KL(π_old‖π_θ) per token), ``ratio_mean``, ``ratio_min``,
    ``ratio_max``, ``num_tokens`` (Σ mask).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be the same (B, T) shape")
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    B, T = logprobs.shape
    adv = advantages.to(logprobs.dtype)
    if adv.shape == (B,):
        adv = adv[:, None].expand(B, T)
    elif adv.shape != (B, T):
        raise ValueError(f"advantages must be (B,)=({B},) or (B,T)=({B},{T}), got {tuple(advantages.shape)}")

    log_ratio = (logprobs - old_logprobs.detach().to(logprobs.dtype)).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if is_weights is not None:
        if is_weights.shape != (B, T):
            raise ValueError(f"is_weights must be (B,T)=({B},{T}), got {tuple(is_weights.shape)}")
        pg = pg * is_weights.detach().to(pg.dtype)
    lower = torch.zeros_like(clipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        lower = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    loss = aggregate(pg, mask, mode=aggregation, num_seqs=num_seqs, num_tokens=num_tokens, max_len=max_len)

    with torch.no_grad():
        valid = mask.bool()
        lr = log_ratio.detach()
        r = ratio.detach()
        any_valid = bool(valid.any())
        metrics = {
            "pg_clipfrac": _masked_mean(clipped.float(), mask),
            "pg_clipfrac_lower": _masked_mean(lower.float(), mask),
            # k3 of KL(π_old ‖ π_θ) with samples from π_old: r − 1 − log r ≥ 0.
            "approx_kl": _masked_mean(r - 1.0 - lr, mask),
            "ratio_mean": _masked_mean(r, mask),
            "ratio_min": r[valid].min() if any_valid else torch.tensor(1.0),
            "ratio_max": r[valid].max() if any_valid else torch.tensor(1.0),
            "num_tokens": mask.float().sum(),
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
               estimator: str = "k3", log_ratio_clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman, "Approximating KL divergence", 2020).

    With δ = ref_logprobs − logprobs (log π_ref/π_θ), per token (B,T), zero where mask is 0:
      k1 = −δ                      (unbiased, can be negative, high variance)
      k2 = ½ δ²                    (biased, ≥ 0)
      k3 = e^δ − δ − 1             (unbiased, ≥ 0; the GRPO estimator π_ref/π − log(π_ref/π) − 1)
    All are 0 where π_θ = π_ref. Gradients flow through ``logprobs``; ``ref_logprobs`` is treated as constant.
    Use as a loss term: ``kl_coef * aggregate(kl_penalty(...), mask, mode=...)``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {list(KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    delta = (ref_logprobs.detach().to(logprobs.dtype) - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = -delta
    elif estimator == "k2":
        kl = 0.5 * delta.square()
    else:
        kl = torch.expm1(delta) - delta
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def js_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
               log_ratio_clamp: float = 20.0) -> torch.Tensor:
    """Per-token Jensen–Shannon divergence JS(π_θ, π_ref) from samples of π_θ, as a loss term (B,T), 0 where masked.

    JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2, is an f-divergence, JS(p, q) = E_{y∼p}[f(q(y)/p(y))] with
    the generator f(u) = ½ [u log u − (u + 1) log((u + 1)/2)] (convex, f(1) = f'(1) = 0, so f ≥ 0). DPH-RL (Li et
    al. 2025, "The Choice of Divergence", arXiv 2509.07430) regularises RLVR with such mass-covering divergences
    (forward KL, JS) toward the initial policy to keep pass@k from collapsing; it evaluates them on samples drawn
    from the initial policy beforehand. Here the samples are the batch's own (π_θ's, or the behaviour policy's
    close to it), scored by the frozen reference model online, as the KL term is; so the term combines with any
    advantage shaping.

    With δ = log π_ref(y) − log π_θ(y) and u = e^δ, per token:

      value     J = f(u) = ½ [u δ − (1 + u) (softplus(δ) − log 2)]          ∈ [0, …), 0 iff π_θ(y) = π_ref(y)
      gradient  ∂J/∂log π_θ(y) = f(u) − u f'(u) = ½ log(2/(1 + u)) = ½ log(π_θ(y)/m(y))

    The gradient is the pathwise part −u f'(u) plus the score-function part f(u) (a stop-gradient copy of the value
    times log π_θ), so that E_{y∼π_θ}[∂J/∂θ] = ∇_θ JS(π_θ, π_ref) exactly for each context — unlike a pathwise-only
    estimator, whose expected gradient is a different divergence's. ``ref_logprobs`` is constant.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    delta = (ref_logprobs.detach().to(logprobs.dtype) - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    u = torch.exp(delta)
    value = 0.5 * (u * delta - (1.0 + u) * (torch.nn.functional.softplus(delta) - math.log(2.0)))
    js = value + value.detach() * (logprobs - logprobs.detach())
    return torch.where(mask.bool(), js, torch.zeros_like(js))


def ref_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, kind: str = "kl",
                estimator: str = "k3") -> torch.Tensor:
    """Per-token divergence to the reference (B,T): ``kind="kl"`` → :func:`kl_penalty` with ``estimator``,
    ``"js"`` → :func:`js_penalty`."""
    if kind not in REF_PENALTIES:
        raise ValueError(f"unknown ref_penalty {kind!r}; allowed: {list(REF_PENALTIES)}")
    if kind == "js":
        return js_penalty(logprobs, ref_logprobs, mask)
    return kl_penalty(logprobs, ref_logprobs, mask, estimator=estimator)


def importance_weights(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, *, mode: str, cap: float,
                       has_behaviour: Optional[torch.Tensor] = None, log_ratio_clamp: float = 20.0) -> torch.Tensor:
    """Off-policy correction weights per token: w = π_old/μ = exp(log π_old − log μ) (log ratio clamped to
    ±``log_ratio_clamp``), truncated at ``cap`` for ``mode="tis"``; 1 where ``has_behaviour`` is False (no μ: the
    token is on-policy). Any shape; float64 out."""
    if mode not in OFF_POLICY or mode == "none":
        raise ValueError(f"importance_weights mode must be 'tis' or 'decoupled_ppo', got {mode!r}")
    w = torch.exp((logprobs.double() - behaviour_logprobs.double()).clamp(-log_ratio_clamp, log_ratio_clamp))
    if mode == "tis":
        w = w.clamp(max=float(cap))
    if has_behaviour is not None:
        w = torch.where(has_behaviour.bool(), w, torch.ones_like(w))
    return w


def learner_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 *, opts: LossOptions, num_seqs: float, num_tokens: float, max_len: float,
                 is_weights: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """One micro-batch's part of the full-batch loss: the PPO term (:func:`policy_loss`, with ``is_weights`` when
    ``opts.off_policy`` corrects) plus ``kl_coef`` × the aggregated reference penalty (:func:`ref_penalty`, when
    ``ref_logprobs`` are given). Denominators are the global ones (see the module docstring).

    Returns (total, policy term, reference term or None, metrics of :func:`policy_loss` plus ``ref_sum``: the sum
    of the per-token penalty over the mask)."""
    denoms = dict(num_seqs=num_seqs, num_tokens=num_tokens, max_len=max_len)
    pg, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=opts.clip_low,
                              clip_high=opts.clip_high, dual_clip=opts.dual_clip, aggregation=opts.aggregation,
                              is_weights=is_weights if opts.off_policy != "none" else None, **denoms)
    total, ref_term = pg, None
    if ref_logprobs is not None:
        tok = ref_penalty(logprobs, ref_logprobs, mask, kind=opts.ref_penalty, estimator=opts.kl_estimator)
        ref_term = aggregate(tok, mask, mode=opts.aggregation, **denoms)
        if opts.kl_coef > 0:
            total = total + opts.kl_coef * ref_term
        metrics["ref_sum"] = tok.detach().sum()
    return total, pg, ref_term, metrics
