"""The benchmark task "bench_text": write a text whose length lies in a given range and that contains a given letter.

    Write 57 to 105 characters containing the letter k.
    Answer: <any text of 57..105 characters with a k in it>

Why this task (``configs/bench_medium.yaml``, issue 18): a speed benchmark needs the compute profile of real RL —
answers of varied length, up to the generation budget — and rewards from a real verifier that vary within a
group, so that advantages are not all zero and the update does real work. The benchmark model is randomly
initialised (``passk_rl.tasks.make_bench_model``: large enough that model compute, not Python, is most of a step,
and built in seconds on any machine); such a model has no skills, so the task must be one a random policy solves
sometimes. Here the answer's length is what the prompt asks for (ranges spread over ``[min_len, max_len]``), so a
policy that learns the task keeps writing answers of varied length up to ``max_len``; a random character-level
policy ends its answer with probability ≈ 1/vocabulary per token (lengths ≈ geometric, mean ≈ 100 characters),
which lands in the range and contains the letter for roughly a fifth to a half of the samples.

The verifier is exact and cheap: the completion's character count and a membership test. Any text is an answer
(there is no format to get wrong), so every verdict has status ``ok``.
"""

from __future__ import annotations

import random
import string
from typing import List

from passk_rl.tasks.base import Prompt, Task, Verdict, register_task

SPLITS = ("train", "test")


@register_task("bench_text")
class BenchTextTask(Task):
    """Args: seed (the prompts), num_train / num_test (prompts per split), min_len / max_len (the characters any
    range may ask for), width (max − min of one range), letters (those a prompt may ask for)."""

    name = "bench_text"

    def __init__(self, seed: int = 0, num_train: int = 2048, num_test: int = 256, min_len: int = 8,
                 max_len: int = 192, width: int = 64, letters: str = string.ascii_lowercase):
        if not (1 <= min_len and min_len + width <= max_len and width >= 0):
            raise ValueError(f"bench_text: need 1 <= min_len and min_len + width <= max_len, got min_len={min_len}, "
                             f"width={width}, max_len={max_len}")
        if num_train < 1 or num_test < 1:
            raise ValueError(f"bench_text: need num_train >= 1 and num_test >= 1, got {num_train}, {num_test}")
        if not letters:
            raise ValueError("bench_text: letters is empty")
        self.seed, self.min_len, self.max_len, self.width = int(seed), int(min_len), int(max_len), int(width)
        self.letters = letters
        self.sizes = {"train": int(num_train), "test": int(num_test)}

    def prompts(self, split: str) -> List[Prompt]:
        if split not in SPLITS:
            raise ValueError(f"bench_text: unknown split {split!r}; known: {list(SPLITS)}")
        rng = random.Random(f"bench_text:{self.seed}:{split}")  # string seeds hash the same in every process
        out = []
        for i in range(self.sizes[split]):
            lo = rng.randint(self.min_len, self.max_len - self.width)
            letter = rng.choice(self.letters)
            out.append(Prompt(id=f"bench_text-{split}-{i:05d}", answer={"lo": lo, "hi": lo + self.width,
                                                                        "letter": letter},
                              text=f"Write {lo} to {lo + self.width} characters containing the letter {letter}.\n"
                                   f"Answer: "))
        return out

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        a = prompt.answer
        n = len(completion)
        if not a["lo"] <= n <= a["hi"]:
            return Verdict(0.0, detail=f"{n} characters, asked for {a['lo']}..{a['hi']}")
        if a["letter"] not in completion:
            return Verdict(0.0, detail=f"no {a['letter']!r}")
        return Verdict(1.0)
