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
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

AGGREGATIONS = ("seq_mean_token_sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; allowed: {list(AGGREGATIONS)}")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log π(tokens) under ``logits / temperature``: (..., V) logits, (...) int tokens → (...) float32.

    Computed as ``logit[token] − logsumexp(logits)`` in float32 (stable for bf16 logits and large vocabularies;
    never materialises a full log-softmax copy). ``temperature`` must match how the behaviour logprobs were
    produced (vLLM returns raw-logit logprobs by default, i.e. temperature 1).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)} "
                         f"(expected logits = tokens.shape + (vocab,))")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


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
