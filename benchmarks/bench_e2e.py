"""End-to-end throughput of training variants side by side: samples/s, generated tokens/s, the share of each phase
(generate, verify, stats, shape, update, sync, log) in the step time, and each variant's speed as a ratio to the
first one, all measured in this one invocation (this machine is shared and noisy: compare ratios from one run).

    python benchmarks/bench_e2e.py [--config configs/tiny_cpu.yaml] [--steps 8] [--rounds 1] [--efficiency]
        [--variant NAME="dotted.key=value ..."]... [--json FILE] [dotted.key=value ...]

Default variants: ``sync`` (algorithm.max_staleness=0, today's exact loop) and ``async`` (max_staleness=1 with
truncated importance weights). ``--rounds 2`` runs A B A B … so a drift of the machine's load hits every variant.
Each variant starts its own private Ray cluster and actors; the first step of each is warm-up and left out.

``--efficiency`` adds, after each round's variants, what each phase's engine does alone on the same work, and prints
every variant's phases against it (issue 18's targets beside each figure):

- generation: the same vLLM engine (``VLLMGenerator``, same engine arguments and sampling parameters, the same
  prompts and per-step seeds as the run) generating in this process, no Ray actor in between; generated tokens/s
  of the run's rollouts against it (target ≥ 90 %);
- update: a bare single-process torch loop (the same model from the same weights, the engine-alone batches, the
  same micro-batch size, ``passk_rl.losses.policy_loss`` with the run's aggregation and clip, AdamW, gradient clip;
  no Ray, no DeepSpeed, no entropy pass); trained answer tokens/s of the run's update phase against it
  (target ≥ 90 %);
- everything else: the step minus the time the driver waited for generation minus the learner's own ``train_step``
  time: verify, stats, shape, sync (with the probe), log, and collation and Ray calls around the update, as a share
  of the step (target ≤ 10 %).

Figures go to stdout and, as JSON, to ``--json`` (default ``<out>/bench_e2e.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from passk_rl.metrics import PHASES, read_jsonl  # noqa: E402

DEFAULT_VARIANTS = {"sync": "algorithm.max_staleness=0",
                    "async": "algorithm.max_staleness=1 learner.off_policy=tis"}
TARGETS = {"gen": 0.90, "update": 0.90, "else": 0.10}


def machine_note() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} at the time of printing"


def resolve_bench_model(config: str, overrides: Sequence[str] = ()) -> str:
    """The config's model directory, absolute; the benchmark model (``passk_rl.tasks.make_bench_model``) is built
    first when the config names its place and it is missing or stale."""
    from passk_rl.config import load_config
    from passk_rl.tasks import make_bench_model
    from passk_rl.models.resolve import resolve_model

    cfg = load_config(config, list(overrides))
    p = Path(cfg.model.path)
    if (ROOT / p if not p.is_absolute() else p).resolve() == make_bench_model.DEFAULT_DIR.resolve():
        return str(make_bench_model.ensure())
    return resolve_model(cfg.model.path, key="model.path", hub=True).path


def run_variant(config: str, overrides: List[str], steps: int, out_dir: Path, name: str) -> Dict[str, Any]:
    from passk_rl.config import load_config
    from passk_rl.trainer import Trainer

    cfg = load_config(config, [*overrides, f"run.steps={steps}", "eval.enabled=false", f"run.name={name}",
                               f"run.output_dir={out_dir}", "logging.ray_metrics=false", "run.overwrite=true"])
    trainer = Trainer(cfg)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t0
        trainer.train()
    finally:
        trainer.shutdown()
    recs = read_jsonl(trainer.run_dir / "metrics.jsonl")
    steady = recs[1:] or recs
    step_s = sum(r["step_seconds"] for r in steady)
    samples = sum(r["samples_per_s"] * r["step_seconds"] for r in steady)
    tokens = sum(r["gen_tokens"] for r in steady)
    gen_s = sum(r.get("rollout_generate_s", r["phase_seconds"]["generate"]) for r in steady)
    phase = {p: sum(r["phase_seconds"].get(p, 0.0) for r in steady) for p in PHASES}
    # the learner's own train_step time (max over ranks); the rest of the update phase is the driver's collation and
    # the Ray calls
    learner_s = sum(float((r.get("learner") or {}).get("step_seconds", r["phase_seconds"]["update"])) for r in steady)
    other = {p: phase[p] for p in PHASES if p not in ("generate", "update")}
    other["update outside the learner"] = max(phase["update"] - learner_s, 0.0)
    return {"overrides": overrides, "steps": len(recs), "setup_seconds": setup_s,
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after: how busy the machine was
            "warmup_step_seconds": recs[0]["step_seconds"], "step_seconds_mean": step_s / len(steady),
            "samples_per_s": samples / step_s, "gen_tokens_per_s_generating": tokens / max(gen_s, 1e-9),
            "gen_tokens_per_s_step": tokens / step_s, "phase_share": {p: phase[p] / step_s for p in PHASES},
            "update_tokens_per_s": tokens / max(phase["update"], 1e-9),
            "learner_tokens_per_s": tokens / max(learner_s, 1e-9),
            "else_share": max(step_s - phase["generate"] - learner_s, 0.0) / step_s,
            "else_parts_share": {k: v / step_s for k, v in other.items()},
            "samples_per_step": cfg.data.prompts_per_step * cfg.generator.n,
            "staleness": [r.get("staleness", 0) for r in recs]}


# ------------------------------------------------------------------------------------ the engines alone
def step_prompts(cfg, steps: int):
    """The prompts of steps 1..steps as the run draws them (``Trainer.next_prompts`` on the same seed)."""
    from passk_rl.tasks import make_task
    from passk_rl.trainer import Trainer

    t = Trainer(cfg)
    task = make_task(cfg.task.name, **cfg.task.params)
    t.train_prompts = task.prompts(cfg.task.train_split)
    if cfg.data.max_prompts:
        t.train_prompts = t.train_prompts[: cfg.data.max_prompts]
    t.rng, t.order = random.Random(cfg.run.seed), []
    return task, [t.next_prompts() for _ in range(steps)]


def engine_alone(cfg, model_path: str, steps: int) -> Dict[str, Any]:
    """The run's vLLM engine generating the run's prompts in this process: tokens/s per step, and the samples."""
    from transformers import AutoTokenizer

    from actors.generator import VLLMGenerator

    g = cfg.generator
    task, batches = step_prompts(cfg, steps)
    tok = AutoTokenizer.from_pretrained(model_path)
    eng = VLLMGenerator(model_path, device=cfg.cluster.device, seed=cfg.run.seed,
                        kv_cache_bytes=int(g.kv_cache_gib * 2**30), max_model_len=cfg.model.max_model_len,
                        dtype=cfg.model.dtype, tensor_parallel_size=g.tensor_parallel_size,
                        enforce_eager=g.enforce_eager, gpu_memory_utilization=g.gpu_memory_utilization,
                        max_num_seqs=g.max_num_seqs, engine_kwargs=dict(g.engine_kwargs) or None,
                        logprobs_mode="raw_logprobs" if g.temperature == 1.0 else "processed_logprobs")
    secs, toks, out = [], [], []
    try:
        for step, prompts in enumerate(batches, start=1):
            texts = [task.format_prompt(p, tok) for p in prompts]
            t0 = time.perf_counter()
            samples = eng.generate(texts, n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                                   seed=cfg.run.seed * 1_000_003 + step)  # the rollout's per-step seed
            secs.append(time.perf_counter() - t0)
            toks.append(sum(len(s.token_ids) for grp in samples for s in grp))
            out.append((prompts, samples))
    finally:
        eng.shutdown()
    s = slice(1, None) if steps > 1 else slice(None)
    return {"step_seconds": secs, "gen_tokens": toks, "tokens_per_s": sum(toks[s]) / sum(secs[s]),
            "start_seconds": eng.start_seconds, "batches": out, "task": task}


def bare_update(cfg, model_path: str, task, batches) -> Dict[str, Any]:
    """A bare single-process torch loop on the engine-alone batches: same model, micro-batch size, loss, AdamW."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from passk_rl import shaping
    from passk_rl.losses import policy_loss, token_logprobs

    L, a = cfg.learner, cfg.algorithm
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    pad = model.config.pad_token_id or 0
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": L.weight_decay},
                             {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=L.lr, betas=tuple(L.betas), eps=L.eps)
    k = int(cfg.schedule.params.get("k", 1)) if cfg.schedule.kind == "fixed" else 1
    secs, toks = [], []
    try:
        for prompts, groups in batches:
            rewards = np.array([[task.verify(p, s.text).reward for s in grp] for p, grp in zip(prompts, groups)])
            adv = shaping.shape_masked(a.shaping, rewards, np.ones_like(rewards, dtype=bool), k=k, **a.shaping_params)
            flat = [(s.prompt_token_ids, s.token_ids, s.logprobs, float(adv[i, j]))
                    for i, grp in enumerate(groups) for j, s in enumerate(grp)]
            t0 = time.perf_counter()
            flat.sort(key=lambda x: len(x[0]) + len(x[1]))
            n_seq, n_tok = len(flat), sum(len(x[1]) for x in flat)
            max_len = float(L.max_response_len or max(len(x[1]) for x in flat))
            for j in range(0, n_seq, L.micro_batch_size):
                mb = flat[j:j + L.micro_batch_size]
                W = max(len(p) + len(r) for p, r, _, _ in mb)
                T = max(1, max(len(r) for _, r, _, _ in mb))
                ids = torch.full((len(mb), W), pad, dtype=torch.long)
                attn = torch.zeros((len(mb), W), dtype=torch.long)
                pos = torch.zeros((len(mb), T), dtype=torch.long)
                tgt = torch.full((len(mb), T), pad, dtype=torch.long)
                mask = torch.zeros((len(mb), T))
                old = torch.zeros((len(mb), T))
                for i, (p, r, lp, _) in enumerate(mb):
                    ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
                    attn[i, :len(p) + len(r)] = 1
                    pos[i] = torch.clamp(torch.arange(T) + len(p) - 1, max=len(p) + len(r) - 1)
                    tgt[i, :len(r)] = torch.tensor(list(r))
                    mask[i, :len(r)] = 1.0
                    old[i, :len(r)] = torch.tensor(lp)
                advs = torch.tensor([x[3] for x in mb])
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                lp = token_logprobs(logits, tgt, temperature=cfg.generator.temperature)
                loss, _ = policy_loss(lp, old, advs, mask, clip_low=L.clip_low, clip_high=L.clip_high,
                                      dual_clip=L.dual_clip, aggregation=L.aggregation, num_seqs=n_seq,
                                      num_tokens=n_tok, max_len=max_len)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), L.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            secs.append(time.perf_counter() - t0)
            toks.append(n_tok)
    finally:
        torch.set_num_threads(threads)
    s = slice(1, None) if len(secs) > 1 else slice(None)
    return {"step_seconds": secs, "tokens": toks, "tokens_per_s": sum(toks[s]) / sum(secs[s]),
            "threads": os.cpu_count() or 1}


def efficiency_baselines(config: str, overrides: List[str], steps: int) -> Dict[str, Any]:
    from passk_rl.config import load_config

    cfg = load_config(config, overrides)
    model_path = resolve_bench_model(config, overrides)
    print(f"[bench_e2e] the vLLM engine alone, in this process ({steps} batches)", flush=True)
    eng = engine_alone(cfg, model_path, steps)
    print(f"[bench_e2e] a bare single-process torch update loop ({steps} steps)", flush=True)
    bare = bare_update(cfg, model_path, eng.pop("task"), eng.pop("batches"))
    return {"engine_alone": eng, "bare_update": bare}


def _pct(x: Optional[float]) -> str:
    return "   n/a" if x is None else f"{100 * x:5.0f}%"


def print_efficiency(results: Dict[str, List[Dict[str, Any]]], base: List[Dict[str, Any]]) -> Dict[str, Any]:
    eng = sum(b["engine_alone"]["tokens_per_s"] for b in base) / len(base)
    bare = sum(b["bare_update"]["tokens_per_s"] for b in base) / len(base)
    print(f"\nper-phase efficiency (vLLM engine alone: {eng:.0f} generated tokens/s; bare torch loop "
          f"({base[0]['bare_update']['threads']} threads): {bare:.0f} trained tokens/s)")
    print(f"{'variant':<12} {'gen tok/s':>10} {'of alone':>9} {'≥90%':>5}   {'update tok/s':>12} {'of bare':>8} {'≥90%':>5} "
          f"{'(learner':>9} {'of bare)':>8}   {'else':>6} {'≤10%':>5}  else, by part")
    out = {"engine_alone_tokens_per_s": eng, "bare_update_tokens_per_s": bare, "targets": TARGETS, "variants": {}}
    for name, runs in results.items():
        m = lambda k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
        gen, upd, lrn, other = m("gen_tokens_per_s_generating"), m("update_tokens_per_s"), m("learner_tokens_per_s"), \
            m("else_share")
        parts = {k: sum(r["else_parts_share"][k] for r in runs) / len(runs) for k in runs[0]["else_parts_share"]}
        ok = lambda x: "yes" if x else "NO"  # noqa: E731
        print(f"{name:<12} {gen:10.0f} {_pct(gen / eng):>9} {ok(gen / eng >= TARGETS['gen']):>5}   {upd:12.0f} "
              f"{_pct(upd / bare):>8} {ok(upd / bare >= TARGETS['update']):>5} {lrn:9.0f} {_pct(lrn / bare):>8}   "
              f"{_pct(other):>6} {ok(other <= TARGETS['else']):>5}  "
              + " ".join(f"{k} {100 * v:.1f}%" for k, v in parts.items() if v >= 0.0005))
        out["variants"][name] = {"gen_tokens_per_s": gen, "gen_of_engine_alone": gen / eng, "update_tokens_per_s": upd,
                                 "update_of_bare_loop": upd / bare, "learner_tokens_per_s": lrn,
                                 "learner_of_bare_loop": lrn / bare, "else_share": other, "else_parts_share": parts}
    print("(gen: the run's rollout generate calls, Ray included; update: the driver's update phase; learner: the "
          "learner's own train_step; else: step − generation wait − learner train_step. In the async variant "
          "generation overlaps the update, so both run slower than alone by design.)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="k=v ..."')
    ap.add_argument("--efficiency", action="store_true",
                    help="also measure the engine alone and a bare torch loop, and print each phase against them")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="where the figures go (default: <out>/bench_e2e.json)")
    ap.add_argument("overrides", nargs="*", help="applied to every variant")
    args = ap.parse_args()
    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = {}
        for v in args.variant:
            name, _, spec = v.partition("=")
            variants[name] = spec
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_e2e_"))
    started = datetime.datetime.now(datetime.timezone.utc)
    overrides = [*args.overrides, f"model.path={resolve_bench_model(args.config, args.overrides)}"]
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in variants}
    base: List[Dict[str, Any]] = []
    path = Path(args.json) if args.json else out_dir / "bench_e2e.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "bench_e2e", "config": args.config, "overrides": args.overrides,
           "started_utc": started.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
           "steps": args.steps, "rounds": args.rounds, "variants": variants, "results": results, "baselines": base,
           "efficiency": None}
    for rnd in range(args.rounds):
        for name, spec in variants.items():
            ov = [*overrides, *shlex.split(spec)]
            print(f"[bench_e2e] round {rnd + 1}/{args.rounds}: {name} ({' '.join(ov) or 'no overrides'})", flush=True)
            results[name].append(run_variant(args.config, ov, args.steps, out_dir, f"{name}-{rnd}"))
            path.write_text(json.dumps(doc, indent=2, default=str))  # what is done so far
        if args.efficiency:
            base.append(efficiency_baselines(args.config, overrides, args.steps))
            path.write_text(json.dumps(doc, indent=2, default=str))

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in results[name]) / len(results[name])

    first = next(iter(variants))
    print(f"\nbench_e2e  {args.config}  {' '.join(args.overrides)}  ({args.steps} steps per run, first left out; "
          f"{args.rounds} round(s); {machine_note()})")
    print(f"{'variant':<12} {'samples/s':>10} {'× ' + first:>10} {'step s':>8} {'tok/s gen':>10} {'setup s':>8}  "
          f"phase shares")
    for name in variants:
        sps = mean(name, "samples_per_s")
        shares = {p: sum(r["phase_share"][p] for r in results[name]) / len(results[name]) for p in PHASES}
        print(f"{name:<12} {sps:10.1f} {sps / mean(first, 'samples_per_s'):10.2f} {mean(name, 'step_seconds_mean'):8.2f} "
              f"{mean(name, 'gen_tokens_per_s_generating'):10.0f} {mean(name, 'setup_seconds'):8.1f}  "
              + " ".join(f"{p} {100 * v:.0f}%" for p, v in shares.items() if v >= 0.005))
    eff = print_efficiency(results, base) if base else None
    doc.update(machine=machine_note(), efficiency=eff)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
