"""The rollout stage of the driver loop: batches of verified samples, at most ``max_staleness`` weight versions behind.

``max_staleness = 0`` — ``get(step)`` draws the step's prompts, samples them with the weights the engines hold
(synced after the previous update) and verifies them, in the caller's thread: the exact on-policy loop.

``max_staleness = 1`` — one-step off-policy (as verl's one-step overlap): while the learner trains on batch t,
``prefetch(t + 1)`` samples and verifies batch t + 1 in a background thread with the weights the engines hold,
those of step t − 1's update. ``wait_idle()`` (the driver calls it before syncing) waits for that batch, so an
engine never swaps weights in the middle of one; ``get(t + 1)`` then returns it at once. Each batch is tagged with
the weight version that sampled it, so the driver records its staleness and the learner corrects for it
(``learner.off_policy``).

The queue is bounded by construction: one batch in flight at most, and only between ``prefetch`` and the next
``wait_idle``. A batch carries the data-order state from before its prompts were drawn, so a checkpoint taken
while a batch waits can put those prompts back (the batch is redrawn after a resume, with newer weights: exact
resume holds for ``max_staleness = 0``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from passk_rl.batch import Batch
from passk_rl.config import check_field
from passk_rl.tasks import Prompt


@dataclasses.dataclass
class Rollout:
    step: int
    prompts: List[Prompt]
    samples: List[List[Any]]  # [prompt][sample] actors.generator.Sample
    verdicts: List[Any]  # flat, prompt-major
    status_counts: Dict[str, int]
    rewards: np.ndarray  # (G, n)
    truncated: np.ndarray  # (G, n) bool: finish_reason "length"
    weights_version: int  # the learner step whose update the sampling weights came from (0: the base model)
    order_before: tuple  # (order list, rng state) before this batch's prompts were drawn
    generate_seconds: float
    verify_seconds: float

    def learner_batch(self, advantages: np.ndarray) -> Batch:
        """The learner's batch: every sample (prompt-major) with its advantage from ``advantages`` (G, n), as
        columns (passk_rl/batch.py)."""
        adv = np.asarray(advantages, dtype=np.float64)
        if adv.shape != self.rewards.shape:
            raise ValueError(f"advantages have shape {adv.shape}, the rollout's rewards {self.rewards.shape}")
        flat = [s for group in self.samples for s in group]
        return Batch.from_columns([s.prompt_token_ids for s in flat], [s.token_ids for s in flat], adv.reshape(-1),
                                  [s.logprobs for s in flat])


class RolloutStage:
    def __init__(self, *, gen: Any, verifier: Any, task: Any, tokenizer: Any, draw: Callable[[], List[Prompt]],
                 order_state: Callable[[], tuple], n: int, temperature: float, top_p: float, max_tokens: int,
                 seed: int, max_staleness: int = 0):
        check_field("algorithm.max_staleness", max_staleness)
        self.gen, self.verifier, self.task, self.tokenizer = gen, verifier, task, tokenizer
        self.draw, self.order_state = draw, order_state
        self.n, self.temperature, self.top_p, self.max_tokens, self.seed = n, temperature, top_p, max_tokens, seed
        self.max_staleness = max_staleness
        self.weights_version = 0  # what the engines hold now
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="rollout") if max_staleness else None
        self._pending: Optional[cf.Future] = None
        self._ready: Optional[Rollout] = None
        self._untrained: Optional[tuple] = None  # order state before prompts drawn but not yet handed out

    def _produce(self, step: int) -> Rollout:
        order_before = self.order_state()
        self._untrained = order_before
        prompts = self.draw()
        texts = [self.task.format_prompt(p, self.tokenizer) for p in prompts]
        version = self.weights_version
        t0 = time.perf_counter()
        # the same per-step seed whatever the staleness: a batch depends on (step, weights) only
        samples = self.gen.generate(texts, n=self.n, temperature=self.temperature, top_p=self.top_p,
                                    max_tokens=self.max_tokens, seed=self.seed * 1_000_003 + step)
        t1 = time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(self.n)]
        verdicts = self.verifier.verify(flat_prompts, [s.text for group in samples for s in group])
        counts = self.verifier.last_counts()  # this call's: one verify at a time, in this thread
        t2 = time.perf_counter()
        shape = (len(prompts), self.n)
        return Rollout(
            step=step, prompts=prompts, samples=samples, verdicts=verdicts, status_counts=counts,
            rewards=np.array([v.reward for v in verdicts], dtype=np.float64).reshape(shape),
            truncated=np.array([s.finish_reason == "length" for g in samples for s in g]).reshape(shape),
            weights_version=version, order_before=order_before, generate_seconds=t1 - t0, verify_seconds=t2 - t1)

    def get(self, step: int) -> Rollout:
        """The batch of ``step``: produced now (staleness 0, or nothing prefetched) or the prefetched one."""
        if self._pending is not None:
            self.wait_idle()
        if self._ready is not None:
            r, self._ready = self._ready, None
            if r.step != step:
                raise RuntimeError(f"rollout: asked for step {step}, but the prefetched batch is for step {r.step}")
        else:
            r = self._produce(step)
        self._untrained = None  # handed to the driver: from here its prompts belong to the step
        return r

    def prefetch(self, step: int) -> None:
        """Start producing ``step``'s batch in the background (staleness 1; a no-op at staleness 0)."""
        if self._pool is None or self._pending is not None or self._ready is not None:
            return
        self._pending = self._pool.submit(self._produce, step)

    def wait_idle(self) -> None:
        """Wait for a batch in flight (its errors surface here); afterwards the engines may swap weights."""
        if self._pending is not None:
            fut, self._pending = self._pending, None
            self._ready = fut.result()

    def synced(self, version: int) -> None:
        """The engines now hold the weights of learner step ``version``."""
        self.weights_version = int(version)

    def untrained_order_state(self) -> tuple:
        """(order, rng state) to checkpoint: from before any prompts drawn for a batch the driver has not taken
        yet (waiting, in flight, or lost with a dead engine), else the current one."""
        return self._untrained if self._untrained is not None else self.order_state()

    def close(self) -> None:
        if self._pool is not None:
            try:
                self.wait_idle()
            except Exception:  # noqa: BLE001 - closing after a failure; the failure was raised already
                pass
            self._pool.shutdown(wait=True)
            self._pool = None
