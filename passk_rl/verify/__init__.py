"""Verifier building blocks: math answer extraction/equivalence and a sandbox for untrusted code.

Both run their risky part in a separate process with a wall-clock limit, so they work from any thread of any
process (a Ray actor method may run off the main thread, where ``signal.alarm`` cannot be used).
"""

from passk_rl.verify.math_equiv import (
    MathCheck,
    MathChecker,
    LazyMathChecker,
    extract_answer_phrase,
    extract_hash_answer,
    gsm8k_gold_answer,
    last_boxed,
    last_number,
    normalize_numeric_answer,
)
from passk_rl.verify.sandbox import Sandbox, SandboxLimits, SandboxResult

__all__ = [
    "MathCheck",
    "MathChecker",
    "LazyMathChecker",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "extract_answer_phrase",
    "extract_hash_answer",
    "gsm8k_gold_answer",
    "last_boxed",
    "last_number",
    "normalize_numeric_answer",
]
