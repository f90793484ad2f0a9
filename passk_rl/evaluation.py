"""The one evaluation pipeline: sample and score → a counts record → pass@k with intervals → paired changes.

Every held-out number of the project comes out of these functions: the trainer's evaluations (``eval/step_*.json``,
the base → final change in ``summary.json``), ``python -m passk_rl.evaluate`` (any models, differences against
the first) and ``python -m passk_rl.experiment`` (methods × training seeds). Pure: numpy and
``passk_rl.estimators``; the generator pool and verifier pool are passed in, so nothing here imports Ray.

A *record* is one model's evaluation on a list of problems: ``n`` samples per problem, ``counts`` (correct ones per
problem), ``prompt_ids``. pass@k per problem is the unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al. 2021).
Intervals come from ``passk_rl.estimators.seed_prompt_interval`` over a (training seeds × problems) matrix: a
two-level percentile bootstrap (seeds, then problems) with a Student-t interval over the per-seed means beside
it; with one record (one seed) it is the usual percentile bootstrap over problems. Differences are paired: the
same problems (and, for methods, the same training seeds) in both rows, resampled together.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from passk_rl.estimators import SeedPromptInterval, pass_at_k, seed_prompt_interval
from passk_rl.tasks import STATUSES, Prompt, Task

Record = Mapping[str, Any]


def score(gen: Any, verifier: Any, task: Task, prompts: List[Prompt], *, tokenizer: Any, n: int,
          ks: Sequence[int], temperature: float, max_tokens: int, seed: int, n_boot: int = 1000,
          threshold: float = 1.0, keep_samples: bool = False) -> Dict[str, Any]:
    """Sample ``n`` completions per prompt with ``gen`` (per-request seeds from ``seed``: the same seed gives every
    model the same sampling randomness), verify them with ``verifier``, and reduce to a record.

    A sample counts as correct when its reward is ≥ ``threshold``; ks above n are dropped. Returns "pass_at_k"
    (``curve`` of this record), "n", "num_prompts", "counts", "prompt_ids", "verifier_status" (verdicts per
    status), "reward_mean", "ks" (those reported), "generate_seconds" and "verify_seconds"; with
    ``keep_samples`` also "samples": ``[prompt][sample]`` of {"text", "reward", "status"}.
    """
    texts = [task.format_prompt(p, tokenizer) for p in prompts]
    t0 = time.perf_counter()
    samples = gen.generate(texts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    t1 = time.perf_counter()
    flat_prompts = [p for p in prompts for _ in range(n)]
    verdicts = verifier.verify(flat_prompts, [s.text for group in samples for s in group])
    t2 = time.perf_counter()
    rewards = np.array([v.reward for v in verdicts], dtype=np.float64).reshape(len(prompts), n)
    status = {s: 0 for s in STATUSES}
    for v in verdicts:
        status[v.status] += 1
    ks_used = [int(k) for k in ks if k <= n]
    rec = {"n": n, "counts": (rewards >= threshold).sum(axis=1).tolist(), "prompt_ids": [p.id for p in prompts]}
    out: Dict[str, Any] = {"pass_at_k": curve([rec], ks_used, n_boot=n_boot, seed=seed), **rec}
    out.update({"num_prompts": len(prompts), "verifier_status": status, "reward_mean": float(rewards.mean()), "ks": ks_used,
                "generate_seconds": t1 - t0, "verify_seconds": t2 - t1})
    if keep_samples:
        out["samples"] = [[{"text": s.text, "reward": float(verdicts[i * n + j].reward),
                            "status": verdicts[i * n + j].status} for j, s in enumerate(group)]
                          for i, group in enumerate(samples)]
    return out


def per_prompt(record: Record, k: int) -> np.ndarray:
    """(P,) unbiased pass@k of every problem of ``record``."""
    n = int(record["n"])
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} cannot be estimated from n={n} samples per problem (need 1 <= k <= n)")
    return np.asarray(pass_at_k(n, np.asarray(record["counts"]), int(k)), dtype=np.float64)


def check_paired(records: Sequence[Record], what: str = "evaluations") -> None:
    """ValueError unless every record has the same problems (ids, in order) and the same n."""
    first = records[0]
    for r in records[1:]:
        if list(r["prompt_ids"]) != list(first["prompt_ids"]) or int(r["n"]) != int(first["n"]):
            raise ValueError(f"{what}: not evaluated on the same problems with the same n, so they cannot be "
                             f"paired ({r.get('label', '?')} vs {first.get('label', '?')})")


def interval(records: Sequence[Record], k: int, *, n_boot: int = 1000, seed: int = 0) -> SeedPromptInterval:
    """pass@k of one model or method: ``records`` holds one evaluation per training seed (one record: one model)."""
    check_paired(records)
    return seed_prompt_interval(np.stack([per_prompt(r, k) for r in records]), n_boot=n_boot, seed=seed)


def difference(after: Sequence[Record], before: Sequence[Record], k: int, *, n_boot: int = 1000,
               seed: int = 0) -> SeedPromptInterval:
    """pass@k(after) − pass@k(before), paired over problems and training seeds.

    ``before`` holds one record per record of ``after`` (the same training seeds, in the same order), or a single
    record (a base model) that every seed of ``after`` is compared with.
    """
    if len(before) not in (1, len(after)):
        raise ValueError(f"difference: {len(after)} records after but {len(before)} before (need 1 or as many)")
    check_paired([*after, *before])
    b = np.stack([per_prompt(r, k) for r in before])
    return seed_prompt_interval(np.stack([per_prompt(r, k) for r in after]) - b, n_boot=n_boot, seed=seed)


def as_dict(iv: SeedPromptInterval) -> Dict[str, Any]:
    """{"mean", "lo", "hi"}, plus the t interval and per-seed means when there are several seeds."""
    if iv.seeds > 1:
        return dataclasses.asdict(iv)
    return {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi}


def curve(records: Sequence[Record], ks: Sequence[int], *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """{"k": interval} for every k (keys are strings, as in the JSON files)."""
    return {str(k): as_dict(interval(records, int(k), n_boot=n_boot, seed=seed)) for k in ks}


def change(before: Record, after: Record, *, n_boot: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """{"k": paired interval of the change} between two evaluations of the same problems, for the ks both report."""
    ks = [k for k in before["pass_at_k"] if k in after["pass_at_k"]]
    return {k: as_dict(difference([after], [before], int(k), n_boot=n_boot, seed=seed)) for k in ks}
