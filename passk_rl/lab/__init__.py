"""Exact policy-gradient lab: test the seed's Pass@K claims in a simulator with exact pass@k and gradients.

``python -m passk_rl.lab EXPERIMENT [--quick] [--seeds N] [--out DIR]`` with EXPERIMENT in
bias, variance, phase1, phase2, phase3, complexity, keep, all. Writes DIR/report.md (tables, plots, computed
Findings), DIR/*.png and DIR/results.json. Uses the math core (passk_rl.shaping / stats / schedule) unchanged.

Modules: env (prompt population + softmax policy), exact (enumeration over c ~ Binomial), train (stochastic and
exact-expectation policy-gradient training), theory (bias, variance, complexity), phases (Phases 1–3), keep (issue 20: pass@K without giving up
pass@1, against the multi_k frontier),
report (markdown / plots / json), ci (Student-t intervals).
"""

from passk_rl.lab.experiments import EXPERIMENTS, run  # noqa: F401
