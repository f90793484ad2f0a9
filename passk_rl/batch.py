"""The learner batch as columns: one flat token array plus per-sample lengths, advantages and behaviour logprobs.

A batch travels from the rollout stage through Ray to every learner rank as a handful of numpy arrays (Ray ships
them as out-of-band buffers, not as pickled Python lists), is sharded and split into micro-batches by index, and
becomes padded torch tensors in one vectorised :func:`collate`. Pure numpy/torch: no Ray, vLLM or DeepSpeed.

Layout (B samples; sample i has a prompt of ``P_i ≥ 1`` and a response of ``R_i ≥ 0`` tokens):

* ``tokens`` (Σ (P_i + R_i),) int32 — each sample's prompt ids followed by its response ids, samples one after
  another;
* ``prompt_lens``, ``response_lens`` (B,) int64;
* ``advantages`` (B,) float32 — the shaped advantage of each sample;
* ``behaviour_logprobs`` (Σ R_i,) float32 — log μ of each response token under the policy that sampled it, in
  the learner's temperature convention (see :mod:`actors.learner`); rows with ``has_behaviour[i] = False`` hold
  zeros and are scored on-policy (ratio 1);
* ``has_behaviour`` (B,) bool;
* ``is_weights`` (Σ R_i,) float32 or None — per-token importance weights, set by the learner's off-policy
  correction.
"""

from __future__ import annotations

import dataclasses
import heapq
from itertools import chain, repeat
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch


def _starts(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens), dtype=np.int64)
    if len(lens) > 1:
        np.cumsum(lens[:-1], out=out[1:])
    return out


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray
    prompt_lens: np.ndarray
    response_lens: np.ndarray
    advantages: np.ndarray
    behaviour_logprobs: np.ndarray
    has_behaviour: np.ndarray
    is_weights: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_columns(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     advantages: Sequence[float], behaviour_logprobs: Sequence[Optional[Sequence[float]]],
                     *, where: str = "batch") -> "Batch":
        """From per-sample sequences (ragged lists or arrays); checks the result (:meth:`validate`)."""
        B = len(prompts)
        if not (len(responses) == len(advantages) == len(behaviour_logprobs) == B):
            raise ValueError(f"{where}: {B} prompts, {len(responses)} responses, {len(advantages)} advantages and "
                             f"{len(behaviour_logprobs)} behaviour logprob rows: they must be equal")
        P = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=B)
        R = np.fromiter((len(r) for r in responses), dtype=np.int64, count=B)
        for i in range(B):
            lp = behaviour_logprobs[i]
            if lp is not None and len(lp) != R[i]:
                raise ValueError(f"{where}[{i}]: behaviour_logprobs has {len(lp)} entries but response_token_ids "
                                 f"has {R[i]}")
        tokens = np.fromiter(chain.from_iterable(x for p, r in zip(prompts, responses) for x in (p, r)),
                             dtype=np.int32, count=int(P.sum() + R.sum()))
        has = np.fromiter((lp is not None for lp in behaviour_logprobs), dtype=bool, count=B)
        blp = np.fromiter(chain.from_iterable(lp if lp is not None else repeat(0.0, int(R[i]))
                                              for i, lp in enumerate(behaviour_logprobs)),
                          dtype=np.float64, count=int(R.sum())).astype(np.float32)
        batch = cls(tokens=tokens, prompt_lens=P, response_lens=R,
                    advantages=np.asarray(advantages, dtype=np.float64).astype(np.float32).reshape(-1),
                    behaviour_logprobs=blp, has_behaviour=has)
        # advantages are checked before the float32 cast would turn a huge finite one into inf
        bad = ~np.isfinite(np.asarray(advantages, dtype=np.float64).reshape(-1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{where}[{i}]: advantage is not finite ({float(advantages[i])})")
        return batch.validate(where=where)

    @classmethod
    def from_samples(cls, samples: Sequence[Mapping[str, Any]], *, where: str = "batch",
                     default_advantage: Optional[float] = None) -> "Batch":
        """From a list of dicts (``prompt_token_ids``, ``response_token_ids``, ``advantage``, optional
        ``behaviour_logprobs``); ``default_advantage`` fills a missing advantage (scoring needs none)."""
        if isinstance(samples, Batch):
            return samples.validate(where=where)
        if not isinstance(samples, (list, tuple)):
            raise ValueError(f"{where} must be a Batch or a list of samples (dicts), got {type(samples).__name__}")
        need = ("prompt_token_ids", "response_token_ids") + (("advantage",) if default_advantage is None else ())
        for i, s in enumerate(samples):
            if not isinstance(s, Mapping):
                raise ValueError(f"{where}[{i}] must be a dict, got {type(s).__name__}")
            for key in need:
                if key not in s:
                    raise ValueError(f"{where}[{i}] is missing key {key!r} (has {sorted(s)})")
        adv = []
        for i, s in enumerate(samples):
            a = s.get("advantage", default_advantage)
            try:
                adv.append(float(a))
            except (TypeError, ValueError):
                raise ValueError(f"{where}[{i}]: advantage must be a number, got {a!r}") from None
        return cls.from_columns([s["prompt_token_ids"] for s in samples], [s["response_token_ids"] for s in samples],
                                adv, [s.get("behaviour_logprobs") for s in samples], where=where)

    @classmethod
    def dummy(cls, pad_id: int) -> "Batch":
        """One placeholder sample (a pad prompt and response): the padding micro-batch of a rank with fewer
        micro-batches than the others. It runs the collectives; :func:`collate` gives it an all-zero mask."""
        return cls(np.array([pad_id, pad_id], np.int32), np.array([1], np.int64), np.array([1], np.int64),
                   np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, bool))

    # ------------------------------------------------------------------ checks and views
    def validate(self, *, where: str = "batch") -> "Batch":
        """Raise ValueError naming the sample when a column is malformed; returns self."""
        B = len(self.prompt_lens)
        for name in ("response_lens", "advantages", "has_behaviour"):
            if getattr(self, name).shape != (B,):
                raise ValueError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({B},)")
        if (self.prompt_lens < 1).any():
            i = int(np.argmax(self.prompt_lens < 1))
            raise ValueError(f"{where}[{i}]: prompt_token_ids is empty (need at least one token to condition on)")
        if (self.response_lens < 0).any():
            raise ValueError(f"{where}: negative response length")
        if self.tokens.shape != (int(self.prompt_lens.sum() + self.response_lens.sum()),):
            raise ValueError(f"{where}: tokens has {self.tokens.size} entries, the lengths add up to "
                             f"{int(self.prompt_lens.sum() + self.response_lens.sum())}")
        n_resp = int(self.response_lens.sum())
        for name in ("behaviour_logprobs",) + (("is_weights",) if self.is_weights is not None else ()):
            if getattr(self, name).shape != (n_resp,):
                raise ValueError(f"{where}: {name} has {getattr(self, name).size} entries for {n_resp} response "
                                 f"tokens")
        nan = np.isnan(self.behaviour_logprobs)
        if nan.any():
            i = int(np.searchsorted(np.cumsum(self.response_lens), int(np.argmax(nan)), side="right"))
            raise ValueError(f"{where}[{i}]: behaviour_logprobs contains NaN")
        if not np.isfinite(self.advantages).all():
            i = int(np.argmax(~np.isfinite(self.advantages)))
            raise ValueError(f"{where}[{i}]: advantage is not finite ({float(self.advantages[i])})")
        return self

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def sizes(self) -> np.ndarray:
        """Prompt + response tokens per sample."""
        return self.prompt_lens + self.response_lens

    def __getitem__(self, i: int) -> Dict[str, Any]:
        """Sample ``i`` as a dict of lists (for one-off uses such as the weight-sync probe)."""
        i = range(len(self))[i]
        s = int(_starts(self.sizes())[i])
        P, R = int(self.prompt_lens[i]), int(self.response_lens[i])
        r0 = int(self.response_lens[:i].sum())
        return {"prompt_token_ids": self.tokens[s:s + P].tolist(), "response_token_ids": self.tokens[s + P:s + P + R].tolist(),
                "behaviour_logprobs": self.behaviour_logprobs[r0:r0 + R].tolist() if self.has_behaviour[i] else None,
                "advantage": float(self.advantages[i])}

    def select(self, idx: Union[Sequence[int], np.ndarray]) -> "Batch":
        """The samples ``idx`` (in that order) as a new batch."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        sizes = self.sizes()
        tok = _gather_rows(self.tokens, _starts(sizes), sizes, idx)
        rs, rl = _starts(self.response_lens), self.response_lens
        return Batch(tokens=tok, prompt_lens=self.prompt_lens[idx], response_lens=rl[idx],
                     advantages=self.advantages[idx], behaviour_logprobs=_gather_rows(self.behaviour_logprobs, rs, rl, idx),
                     has_behaviour=self.has_behaviour[idx],
                     is_weights=None if self.is_weights is None else _gather_rows(self.is_weights, rs, rl, idx))

    def response_rows(self, flat: np.ndarray) -> List[List[float]]:
        """A flat per-response-token array split into one list per sample."""
        return [x.tolist() for x in np.split(np.asarray(flat), np.cumsum(self.response_lens)[:-1])] if len(self) else []


def _gather_rows(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Concatenate the ragged rows ``idx`` of ``flat`` (row i = flat[starts[i]:starts[i] + lens[i]])."""
    L = lens[idx]
    if not len(idx) or not L.sum():
        return flat[:0].copy()
    pos = np.arange(int(L.sum()), dtype=np.int64) - np.repeat(_starts(L), L) + np.repeat(starts[idx], L)
    return flat[pos]


def shard_by_tokens(samples: Union[Batch, Sequence[Mapping[str, Any]]], world_size: int) -> List[List[int]]:
    """Split sample indices over ``world_size`` ranks balancing prompt+response tokens (greedy LPT).

    Returns per-rank index lists, each in ascending order. Groups need not stay together: advantages are already
    computed per sample, and the loss is a sum over samples. Ties go to the rank with fewer samples, then the lower
    rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if isinstance(samples, Batch):
        sizes = samples.sizes()
    else:
        sizes = np.array([len(s["prompt_token_ids"]) + len(s["response_token_ids"]) for s in samples], np.int64)
    order = np.lexsort((np.arange(len(sizes)), -sizes))  # largest first, then by index
    heap = [(0, 0, r) for r in range(world_size)]
    shards: List[List[int]] = [[] for _ in range(world_size)]
    for i in order.tolist():
        load, count, r = heapq.heappop(heap)
        shards[r].append(i)
        heapq.heappush(heap, (load + int(sizes[i]), count + 1, r))
    return [sorted(s) for s in shards]


@dataclasses.dataclass
class Collated:
    """One micro-batch as padded tensors: inputs (b, L), response-aligned targets (b, T)."""

    ids: torch.Tensor  # (b, L) prompt+response, right-padded with pad_id
    attn: torch.Tensor  # (b, L) 1 on real tokens
    pos: torch.Tensor  # (b, T) index of the logit that predicts response token t
    tgt: torch.Tensor  # (b, T) response ids
    mask: torch.Tensor  # (b, T) float: 1 on real response tokens of real samples
    old: torch.Tensor  # (b, T) behaviour logprobs (0 where absent)
    has_old: torch.Tensor  # (b,) bool
    adv: torch.Tensor  # (b,) float32, 0 for placeholder samples
    isw: torch.Tensor  # (b, T) importance weights (1 where absent)


def collate(batch: Batch, *, pad_id: int, real: bool = True, device: Union[str, torch.device] = "cpu") -> Collated:
    """Pad a (micro-)batch into tensors, with no per-sample Python loop. ``real=False`` marks a placeholder
    micro-batch (mask and advantages zero).

    The index arithmetic runs in numpy (single-threaded): on tensors this small, torch's intra-op thread pool
    costs more than the work when the cores are busy."""
    P, R = batch.prompt_lens, batch.response_lens
    Ltot = P + R
    b = len(batch)
    L = int(Ltot.max())
    T = max(1, int(R.max()) if b else 1)
    last_tok = max(len(batch.tokens) - 1, 0)
    starts = _starts(Ltot)
    ar_l = np.arange(L)
    valid = ar_l[None, :] < Ltot[:, None]
    ids = np.where(valid, batch.tokens[np.minimum(starts[:, None] + ar_l[None, :], last_tok)], pad_id)
    ar_t = np.arange(T)
    # logits at position P−1+t predict response token t; padded slots point at the last real position
    pos = np.minimum(ar_t[None, :] + P[:, None] - 1, (Ltot - 1)[:, None])
    rvalid = ar_t[None, :] < R[:, None]
    tgt = np.where(rvalid, batch.tokens[np.minimum((starts + P)[:, None] + ar_t[None, :], last_tok)], pad_id)
    mask = (rvalid & real).astype(np.float32)
    rgather = np.minimum(_starts(R)[:, None] + ar_t[None, :], max(len(batch.behaviour_logprobs) - 1, 0))

    def per_token(flat: Optional[np.ndarray], fill: float) -> np.ndarray:
        if flat is None or not len(flat):
            return np.full((b, T), fill, dtype=np.float32)
        return np.where(rvalid, flat.astype(np.float32, copy=False)[rgather], np.float32(fill))

    cols = dict(ids=ids.astype(np.int64), attn=valid.astype(np.int64), pos=pos.astype(np.int64),
                tgt=tgt.astype(np.int64), mask=mask, old=per_token(batch.behaviour_logprobs, 0.0),
                has_old=batch.has_behaviour.copy(), adv=batch.advantages.astype(np.float32) * np.float32(real),
                isw=per_token(batch.is_weights, 1.0))
    return Collated(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in cols.items()})
