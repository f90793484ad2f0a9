"""The learner's update on a GPU against a bare torch loop doing the same update, phase by phase.

Model: Qwen2.5-0.5B's (or 1.5B's: ``--model``) shape with random weights (no hub), bf16. Batch: ``--seqs`` sequences of ``--prompt`` prompt
+ ``--response`` response tokens (random ids, fixed lengths, so no padding favours either side), micro-batch
``--micro``. The learner is the real ``LearnerWorker`` (DeepSpeed ZeRO-2 bf16 with fp32 master weights, AdamW, the
loss of passk_rl/losses.py); the bare loop is one process with fp32 weights under bf16 autocast, the same AdamW
class, the same micro-batches and loss, and only the response logits computed. Each runs in its own process, one
after the other. With ``--phases`` every phase is bracketed by ``cuda.synchronize`` (slower overall, but the split
is exact): forward to the response logits, log-probabilities (+ entropy) and loss, backward, optimizer step.

    python benchmarks/learner_gpu.py [--variants default,no_entropy] [--phases] [--profile] [--json out.json]

Needs CUDA and DeepSpeed (scripts/device_check.sh runs the default variant as its ``bf16_speed`` check).
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=4096, rms_norm_eps=1e-6)
QWEN25_15B = dict(QWEN25_05B, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12)
MODELS = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B}
# learner options each variant changes (everything else as the GPU configs have it, gradient checkpointing off)
VARIANTS = {"default": {}, "no_entropy": {"compute_entropy": False},
            "bf16_grad_accum": {"ds_config_overrides": {"data_types": {"grad_accum_dtype": "bf16"}}},
            "overlap_comm": {"ds_config_overrides": {"zero_optimization": {"overlap_comm": True}}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path, dims: dict) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.to(torch.bfloat16).save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n


def bench_batch(vocab: int, shape: dict, seed: int = 0) -> list:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, vocab, shape["prompt"]).tolist(),
             "response_token_ids": rng.integers(3, vocab, shape["response"]).tolist(),
             "advantage": float(rng.standard_normal())} for _ in range(shape["seqs"])]


class Phases:
    """Wall time per named phase, each bracketed by cuda.synchronize when ``exact`` (else only the step is)."""

    def __init__(self, exact: bool):
        import torch

        self.torch, self.exact, self.t = torch, exact, collections.defaultdict(float)

    def wrap(self, name: str, fn):
        if not self.exact:
            return fn

        def timed(*a, **k):
            self.torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.torch.cuda.synchronize()
            self.t[name] += time.perf_counter() - t0
            return out
        return timed


def timed_steps(step_fn, steps: int, phases: Phases, profile: bool) -> dict:
    import torch

    torch.cuda.reset_peak_memory_stats()
    times, grad_norms, split = [], [], []
    for s in range(steps):
        phases.t.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        grad_norms.append(float(step_fn(s)))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        split.append(dict(phases.t))
    out = {"step_seconds": times, "grad_norms": grad_norms, "phases": split,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step_fn(steps)
            torch.cuda.synchronize()
        out["profile"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    return out


def run_learner(model_path: str, out: str, shape: dict, variant: str, exact: bool, profile: bool) -> None:
    import actors.learner_engine as le

    opts = le.LearnerOptions.from_flat(zero_stage=2, optimizer="adamw", lr=1e-6, micro_batch_size=shape["micro"],
                                       seed=0, bf16=True, grad_clip=1.0, **VARIANTS[variant])
    w = le.LearnerWorker(model_path, opts, device="cuda", world_size=1, master_port=_free_port())
    ph = Phases(exact)
    w._response_logits = ph.wrap("forward", w._response_logits)
    le.token_logprobs_and_entropy = ph.wrap("logprobs", le.token_logprobs_and_entropy)
    le.learner_loss = ph.wrap("loss", le.learner_loss)
    w.engine.backward = ph.wrap("backward", w.engine.backward)
    w.engine.step = ph.wrap("optimizer_step", w.engine.step)
    w._collate = ph.wrap("collate", w._collate)
    batch = bench_batch(w.engine.module.config.vocab_size, shape)
    res = timed_steps(lambda s: w.train_step(batch, step=s + 1)["grad_norm"], shape["steps"], ph, profile)
    Path(out).write_text(json.dumps(res))
    w.shutdown()


def run_bare(model_path: str, out: str, shape: dict, variant: str, exact: bool, profile: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from passk_rl.losses import policy_loss, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = bench_batch(model.config.vocab_size, shape)
    ids = torch.tensor([s["prompt_token_ids"] + s["response_token_ids"] for s in batch], device="cuda")
    adv = torch.tensor([s["advantage"] for s in batch], device="cuda")
    B, R, mb = shape["seqs"], shape["response"], shape["micro"]
    tgt, mask = ids[:, -R:], torch.ones(B, R, device="cuda")
    ph = Phases(exact)

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=x, logits_to_keep=R + 1).logits[:, :-1]

    forward, logprobs = ph.wrap("forward", forward), ph.wrap("logprobs", lambda lg, t: token_logprobs(lg.float(), t))
    loss_fn = ph.wrap("loss", policy_loss)
    backward = ph.wrap("backward", lambda l: l.backward())

    def opt_step():
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return gn

    opt_step = ph.wrap("optimizer_step", opt_step)

    def step(_s):
        for i in range(0, B, mb):
            lp = logprobs(forward(ids[i:i + mb]), tgt[i:i + mb])
            loss, _ = loss_fn(lp, lp.detach(), adv[i:i + mb], mask[i:i + mb], num_seqs=B,
                              num_tokens=float(B * R), max_len=float(R))
            backward(loss)
        return opt_step()

    Path(out).write_text(json.dumps(timed_steps(step, shape["steps"], ph, profile)))


def compare(model_path: Path, shape: dict, variants: list, *, exact: bool = False, profile: bool = False,
            timeout: float = 300) -> dict:
    """Each variant of the learner, then the bare loop, in their own processes; figures per run and ratios."""
    runs = {}
    for name, who in [(v, "learner") for v in variants] + [("bare", "bare")]:
        out = Path(tempfile.mkdtemp()) / f"{name}.json"
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.learner_gpu import run_{who}; "
                f"run_{who}({str(model_path)!r}, {str(out)!r}, {shape!r}, {name!r}, {exact!r}, {profile!r})")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"the {name} run failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
        runs[name] = json.loads(out.read_text())
    tokens = shape["seqs"] * shape["response"]
    fig = {}
    for name, res in runs.items():
        sec = statistics.median(res["step_seconds"][1:])  # the first step pays allocation and kernel selection
        phases = {k: round(statistics.median(p.get(k, 0.0) for p in res["phases"][1:]), 4)
                  for k in res["phases"][-1]} if exact else {}
        fig[name] = {"step_seconds": [round(x, 3) for x in res["step_seconds"]], "median_step_s": round(sec, 4),
                     "trained_tokens_per_s": round(tokens / sec), "peak_gib": round(res["peak_gib"], 2),
                     "grad_norm_first": res["grad_norms"][0], **({"phases_s": phases} if phases else {}),
                     **({"profile": res["profile"]} if "profile" in res else {})}
    for v in variants:
        fig[v]["vs_bare"] = round(fig[v]["trained_tokens_per_s"] / fig["bare"]["trained_tokens_per_s"], 3)
        fig[v]["grad_norm_rel_diff_vs_bare"] = abs(fig[v]["grad_norm_first"] - fig["bare"]["grad_norm_first"]) / \
            max(abs(fig["bare"]["grad_norm_first"]), 1e-12)
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default", help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--model", default="0.5b", choices=sorted(MODELS), help="Qwen2.5 shape (random weights)")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--phases", action="store_true", help="synchronize around every phase and report the split")
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler; top-30 CUDA ops")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    shape = dict(seqs=a.seqs, prompt=a.prompt, response=a.response, micro=a.micro, steps=a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        n = build_model(Path(tmp) / "model", MODELS[a.model])
        print(f"model: Qwen2.5-{a.model.upper()} shape, {n / 1e6:.0f} M parameters, bf16; batch {shape}", flush=True)
        fig = compare(Path(tmp) / "model", shape, variants, exact=a.phases, profile=a.profile)
    for name, f in fig.items():
        prof = f.pop("profile", None)
        print(f"{name}: {json.dumps(f)}")
        if prof:
            print(prof)
            f["profile"] = prof
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
