"""Markdown tables from the JSON that ``bench_trl.py --json`` and ``bench_e2e.py --json`` write (for
docs/results/speed/report.md and README's speed section).

    python benchmarks/speed_report.py docs/results/speed/bench_trl_medium.json docs/results/speed/bench_e2e_medium.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def trl_table(doc: dict) -> str:
    lines = [f"`{doc['config']}`, started {doc['started_utc']} ({doc['steps']} steps per run, first left out; "
             f"{doc['rounds']} interleaved round(s); TRL {doc['trl_version']}; {doc['machine']})", "",
             "| | samples/s | × TRL | generated tokens/s | × TRL | s/step | target |", "|---|---|---|---|---|---|---|"]
    for name, s in doc["summary"].items():
        tgt = "" if s["target_x_trl"] is None else (f"≥ {s['target_x_trl']:.1f}×: "
                                                     + ("met" if s["target_met"] else "missed"))
        tok = "n/a" if s["gen_tokens_per_s"] is None else f"{s['gen_tokens_per_s']:.0f}"
        xt = "n/a" if s["x_trl_tokens"] is None else f"{s['x_trl_tokens']:.2f}"
        lines.append(f"| {name} | {s['samples_per_s']:.2f} | {s['x_trl_samples']:.2f} | {tok} | {xt} | "
                     f"{s['step_seconds']:.1f} | {tgt} |")
    return "\n".join(lines)


def e2e_tables(doc: dict) -> str:
    lines = [f"`{doc['config']}`, started {doc['started_utc']} ({doc['steps']} steps per run, first left out; "
             f"{doc['machine']})", "", "| variant | samples/s | s/step | phase shares |", "|---|---|---|---|"]
    for name, runs in doc["results"].items():
        sps = sum(r["samples_per_s"] for r in runs) / len(runs)
        st = sum(r["step_seconds_mean"] for r in runs) / len(runs)
        shares = {p: sum(r["phase_share"][p] for r in runs) / len(runs) for p in runs[0]["phase_share"]}
        lines.append(f"| {name} | {sps:.2f} | {st:.1f} | "
                     + ", ".join(f"{p} {100 * v:.1f} %" for p, v in shares.items() if v >= 0.0005) + " |")
    eff = doc.get("efficiency")
    if eff:
        t = eff["targets"]
        lines += ["", f"Engines alone: vLLM {eff['engine_alone_tokens_per_s']:.0f} generated tokens/s; bare torch loop "
                      f"{eff['bare_update_tokens_per_s']:.0f} trained tokens/s.", "",
                  f"| variant | generation, % of the engine alone (target ≥ {100 * t['gen']:.0f} %) | update, % of the "
                  f"bare loop (≥ {100 * t['update']:.0f} %) | learner train_step, % of the bare loop | everything "
                  f"else, % of the step (≤ {100 * t['else']:.0f} %) | else, by part |", "|---|---|---|---|---|---|"]
        for name, v in eff["variants"].items():
            lines.append(f"| {name} | {100 * v['gen_of_engine_alone']:.0f} % ({v['gen_tokens_per_s']:.0f} tok/s) | "
                         f"{100 * v['update_of_bare_loop']:.0f} % ({v['update_tokens_per_s']:.0f} tok/s) | "
                         f"{100 * v['learner_of_bare_loop']:.0f} % | {100 * v['else_share']:.1f} % | "
                         + ", ".join(f"{k} {100 * x:.1f} %" for k, x in v["else_parts_share"].items() if x >= 0.0005)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    for f in (argv if argv is not None else sys.argv[1:]):
        doc = json.loads(Path(f).read_text())
        print(f"### {f}\n\n{(trl_table if doc.get('benchmark') == 'bench_trl' else e2e_tables)(doc)}\n\n"
              f"command: `{doc['command']}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
