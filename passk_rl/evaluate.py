"""Held-out evaluation: unbiased pass@k with bootstrap confidence intervals over problems.

``evaluate_pool`` samples n completions per prompt with a generator pool, scores them with a verifier pool and
reduces the per-prompt correct counts with ``passk_rl.estimators.pass_at_k_curve``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from passk_rl.estimators import pass_at_k_curve
from passk_rl.tasks import STATUSES, Prompt, Task


def curve_dict(n: int, counts: Sequence[int], ks: Sequence[int], *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """{"pass_at_k": {"k": {"mean", "lo", "hi"}}} for per-prompt correct ``counts`` out of ``n`` samples."""
    c = np.asarray(counts, dtype=np.int64)
    res = pass_at_k_curve(np.full_like(c, n), c, list(ks), n_boot=n_boot, seed=seed)
    out = {}
    for i, k in enumerate(ks):
        out[str(k)] = {"mean": float(res.mean[i]), "lo": float(res.lo[i]), "hi": float(res.hi[i])}
    return {"pass_at_k": out}


def evaluate_pool(gen: Any, verifier: Any, task: Task, prompts: List[Prompt], *, tokenizer: Any, n: int,
                  ks: Sequence[int], temperature: float, max_tokens: int, seed: int,
                  threshold: float = 1.0) -> Dict[str, Any]:
    texts = [task.format_prompt(p, tokenizer) for p in prompts]
    samples = gen.generate(texts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    flat_prompts = [p for p in prompts for _ in range(n)]
    verdicts = verifier.verify(flat_prompts, [s.text for group in samples for s in group])
    rewards = np.array([v.reward for v in verdicts], dtype=np.float64).reshape(len(prompts), n)
    status = {s: 0 for s in STATUSES}
    for v in verdicts:
        status[v.status] += 1
    counts = (rewards >= threshold).sum(axis=1)
    out = curve_dict(n, counts, [k for k in ks if k <= n], seed=seed)
    out.update({"n": n, "num_prompts": len(prompts), "counts": counts.tolist(),
                "prompt_ids": [p.id for p in prompts], "verifier_status": status,
                "reward_mean": float(rewards.mean())})
    return out
