"""``shape``: rewards (G, n) -> advantages (G, n) for any registered shaping, with argument checks, the clip of an
outside p_hat into what an n-sample group can express, and a per-row K."""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch

from passk_rl.shaping.kernels import Batch
from passk_rl.shaping.registry import ShapingSpec, get, resolve

__all__ = ["shape", "as_k", "k_rows"]


def as_k(k: Any) -> int:
    if isinstance(k, bool):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return k


def k_rows(k: Any, g_rows: int) -> np.ndarray | None:
    """A per-row K as an int64 array (G,), or None when ``k`` is a scalar. Raises ValueError on bad entries."""
    if isinstance(k, (list, tuple, np.ndarray, torch.Tensor)):
        arr = k.detach().cpu().numpy() if isinstance(k, torch.Tensor) else np.asarray(k)
        if arr.ndim == 0:
            return None
        if arr.shape != (g_rows,):
            raise ValueError(f"a per-row k must have shape (G,) = ({g_rows},), got {arr.shape}")
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or (
                np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))):
            raise ValueError(f"a per-row k must hold positive integers, got {arr!r}")
        arr = arr.astype(np.int64)
        if arr.size and arr.min() < 1:
            raise ValueError(f"a per-row k must hold positive integers, got {int(arr.min())} in row {int(arr.argmin())}")
        return arr
    return None


def prepare_rewards(rewards: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    is_torch = isinstance(rewards, torch.Tensor)
    t = rewards.detach() if is_torch else torch.as_tensor(np.asarray(rewards))
    if t.ndim != 2:
        raise ValueError(f"rewards must have shape (G, n), got {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"rewards must have n >= 1 samples per group, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError("rewards must be real")
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    r = t.to(torch.float64)
    # NaN and inf propagate into the row sums, so checking the (G,) sums is enough to detect them.
    if not bool(torch.isfinite(r.sum(1)).all()):
        finite = torch.isfinite(r)
        if bool(finite.all()):
            raise ValueError("rewards are too large: a group's sum overflows float64")
        g, i = (int(v) for v in torch.nonzero(~finite)[0])
        raise ValueError(f"rewards must be finite, got {r[g, i].item()} at group {g}, sample {i}")

    def restore(a: torch.Tensor) -> Any:
        a = a.to(out_dtype)
        return a if is_torch else a.cpu().numpy()

    return r, restore


def prepare_p_hat(p_hat: Any, g_rows: int, device: torch.device) -> torch.Tensor | None:
    if p_hat is None:
        return None
    if isinstance(p_hat, torch.Tensor):
        p = p_hat.detach().to(device=device, dtype=torch.float64)
    if isinstance(p_hat, torch.Tensor):
        p = p_hat.detach().to(device=device, dtype=torch.float64)
    else:
        p = torch.as_tensor(np.asarray(p_hat, dtype=np.float64), device=device)
    if p.shape != (g_rows,):
        raise ValueError(f"p_hat must have shape (G,) = ({g_rows},), got {tuple(p.shape)}")
    bad = ~torch.isfinite(p) | (p < 0) | (p > 1)
    if bool(bad.any()):
        g = int(torch.nonzero(bad)[0])
        raise ValueError(f"p_hat must lie in [0, 1], got {p[g].item()} for group {g}")
    return p


def clip_p_hat(spec: ShapingSpec, p: torch.Tensor | None, n: int, k: int, p_clip: Any) -> torch.Tensor | None:
    """Clip an outside p_hat (G,) into the range an n-sample group can express.

    Why: a plug-in scale (1/sqrt(p(1-p)), alpha_K(p)/sigma, w_K(p), 1/sigma(P_K)) grows without bound as p_hat
    nears 0 or 1. A central estimator's p_hat for a prompt that has rarely been solved sits near 0, and the
    one success in a group then got an advantage of ~1e4 (grpo, EMA p_hat; the GRPO blow-up of issue 11).
    Clipping to the group's own range keeps every advantage within what the group form itself can give at this
    n (``advantage_bound``). Cost: for a true p outside [lo, hi] the update is no longer exactly grad F; it is
    the update for p = lo (a smaller weight on prompts rarer than 1 in n). ``p_clip=0`` turns the clip off
    (exactness tests); a number c in (0, 0.5) clips to [c, 1 - c].
    """
    if isinstance(p_clip, str):
        if p_clip != "group":
            raise ValueError(f"p_clip must be 'group' or a number in [0, 0.5), got {p_clip!r}")
        lo, hi = spec.p_range(n, k) if spec.p_range is not None else (0.0, 1.0)
    elif isinstance(p_clip, bool) or not isinstance(p_clip, (int, float, np.integer, np.floating)) or not (
        0.0 <= float(p_clip) < 0.5
    ):
        raise ValueError(f"p_clip must be 'group' or a number in [0, 0.5), got {p_clip!r}")
    else:
        lo, hi = float(p_clip), 1.0 - float(p_clip)
    if p is None:
        return None
    return p.clamp(lo, hi) if (lo > 0.0 or hi < 1.0) else p


def _shape_rows(spec: ShapingSpec, opts: dict[str, Any], r: torch.Tensor, k: int, ph: torch.Tensor | None,
                binary: bool) -> torch.Tensor:
    """float64 advantages for validated rewards r (G, n) at one K; ``opts`` still holds p_clip if the spec has it."""
    n = r.shape[1]
    opts = dict(opts)
    if "p_clip" in opts:
        p_clip = opts.pop("p_clip")
        ph = clip_p_hat(spec, ph, n, k, p_clip)
        if spec.sigma_floor is not None and ph is not None and p_clip == "group":
            opts["sigma_floor"] = spec.sigma_floor(n, k, opts)
    total = r.sum(1, keepdim=True)
    c = total[:, 0].round().long() if binary else None
    batch = Batch(r=r, n=n, total=total, binary=binary, c=c, p_hat=ph)
    adv = spec.advantages(batch, k=k, **opts)
    zeroes = spec.zero_on_constant(opts) if spec.zero_on_constant is not None else spec.info.baselined
    if zeroes:
        const = (c == 0) | (c == n) if binary else r.amax(1) == r.amin(1)
        if adv.data_ptr() == r.data_ptr():  # never write into the caller's tensor
            adv = adv.clone()
        adv.masked_fill_(const[:, None], 0.0)
    return adv


def shape(name: str, rewards: Any, *, k: Any = 1, p_hat: Any = None, **params: Any) -> Any:
    """Per-sample advantages for one of ``SHAPINGS``.

    Args:
        name: registry name (``info(name).doc`` describes it; docs/shapings.md has the table).
        rewards: ``(G, n)`` float tensor (or numpy array): G groups x n samples, binary or continuous.
        k: target k (ignored by pass@1 shapings); the admissible range depends on the shaping. A ``(G,)`` integer
            array/list/tensor gives each row its own K (the p̂ actor's per-prompt K); every shaping that takes a
            single k accepts it (multi_k, whose Ks are its weights, does not). Each row is then shaped exactly as
            it would be alone with its own K.
        p_hat: optional ``(G,)`` success rates in [0, 1] for plug-in shapings (ignored by the others,
            but still validated). With the default ``p_clip="group"`` it is clipped (and, for passk_analytic, the
            scale it sets is floored) so no advantage exceeds what the group form itself gives at this n
            (``advantage_bound``).
        **params: shaping-specific options; ``REGISTRY[name].defaults`` lists them.

    Returns:
        ``(G, n)`` advantages, same container kind; floating input keeps its dtype, integer/bool input
        gives ``torch.get_default_dtype()``. Mean convention (the loss averages A_i log pi(y_i)).

    Raises:
        ValueError: unknown name or parameter, non-finite rewards, rewards outside the shaping's
            domain, bad p_hat, or a k the shaping cannot take (e.g. loo-1 at k = 1, k > n).
    """
    spec = get(name)
    opts = resolve(spec, params)
    r, restore = prepare_rewards(rewards)
    g_rows, n = r.shape
    rows = k_rows(k, g_rows)
    if rows is not None:
        if spec.info.uses_k_weights:
            raise ValueError(f"shaping {name!r} takes its Ks from weights={{k: w}}, not a per-row k")
        ks = sorted(set(rows.tolist())) if spec.info.uses_k else [1]
    else:
        ks = [as_k(k)]
    for kk in ks:
        spec.check_params(n, kk, opts)
    ph = prepare_p_hat(p_hat, g_rows, r.device)
    if "p_clip" in opts:
        clip_p_hat(spec, None, n, ks[0], opts["p_clip"])  # validate p_clip even without p_hat
    if g_rows == 0:
        return restore(torch.zeros_like(r))
    binary = bool(r.eq(0).logical_or_(r.eq(1)).all())
    if spec.info.reward_domain == "unit" and not binary and bool(((r < 0) | (r > 1)).any()):
        bad = r[(r < 0) | (r > 1)][0].item()
        raise ValueError(f"shaping {name!r} needs rewards in [0, 1] (p_hat is a success rate), got {bad!r}")
    if len(ks) == 1:
        return restore(_shape_rows(spec, opts, r, ks[0], ph, binary))
    out = torch.empty_like(r)
    sel_all = torch.as_tensor(rows, device=r.device)
    for kk in ks:
        sel = sel_all == kk
        out[sel] = _shape_rows(spec, opts, r[sel], kk, None if ph is None else ph[sel], binary)
    return restore(out)
