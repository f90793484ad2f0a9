"""Child process of ``MathChecker``: one JSON request per stdin line, one JSON response per stdout line.

Runs math-verify with its own (``signal.alarm``) timeouts disabled: the parent enforces the wall-clock limit
by killing this process. Exits at stdin EOF, so it never outlives its parent's pipe.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Dict, Optional


def main(memory_mb: Optional[int] = None) -> None:
    # The protocol owns the real stdout; anything else printed (sympy, math-verify) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if memory_mb:
        import resource

        lim = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]

    def _parse(s: str) -> list:
        return parse(s, extraction_config=cfg, parsing_timeout=None)

    @functools.lru_cache(maxsize=8192)
    def _gold(g: str) -> list:
        return _parse("\\boxed{" + g + "}")

    def _matched(parsed: list) -> str:
        # parse() returns [sympy_obj, matched_string]; the string is cheap and safe to log.
        return str(parsed[-1])[:200] if parsed else ""

    def handle(req: Dict[str, Any]) -> Dict[str, Any]:
        gold_s, pred_s = req["gold"], req["pred"]
        pred = _parse("\\boxed{" + pred_s + "}") if req["mode"] == "boxed" else _parse(pred_s)
        gold = _gold(gold_s)
        out: Dict[str, Any] = {"id": req["id"], "gold": _matched(gold), "pred": _matched(pred),
                               "pred_found": bool(pred)}
        if not pred:
            out["equal"] = False
        elif not gold:
            # A reference math-verify cannot parse (free text): exact string match is all we can say.
            out["equal"] = pred_s.strip() == gold_s.strip()
        else:
            out["equal"] = bool(verify(gold, pred, timeout_seconds=None))
        return out

    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            resp = handle(req)
        except MemoryError:
            resp = {"id": req.get("id"), "error": f"math-verify ran out of memory (limit {memory_mb} MiB)"}
        except Exception as e:  # noqa: BLE001 - the parent reports it as a verifier error
            resp = {"id": req.get("id"), "error": f"math-verify raised {type(e).__name__}: {str(e)[:300]}"}
        proto.write(json.dumps(resp) + "\n")


if __name__ == "__main__":
    main()
