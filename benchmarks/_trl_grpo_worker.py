"""TRL's GRPOTrainer on a passk-rl workload, for benchmarks/bench_trl.py (runs in a Python that has `trl`).

    python benchmarks/_trl_grpo_worker.py --model DIR --steps N --task arith --task-params '{}' --prompts 64 --n 16
        --max-tokens 32 --lr 3e-4 --micro-batch 128 --out F

One optimizer step = ``prompts`` × ``n`` completions generated in one round with HF ``generate`` (TRL's default
without vLLM), rewarded by the passk-rl task's own verifier, GRPO loss (``loss_type grpo``: each answer's token mean,
averaged over answers; beta 0). Writes per-step wall times and generated tokens per step as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="arith")
    ap.add_argument("--task-params", default="{}", help="the task's parameters, as JSON")
    ap.add_argument("--split", default="train")
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--micro-batch", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from passk_rl.tasks import make_task

    torch.set_num_threads(args.threads)
    task = make_task(args.task, **json.loads(args.task_params))
    prompts = task.prompts(args.split)
    by_text = {task.format_prompt(p): p for p in prompts}
    ds = Dataset.from_list([{"prompt": task.format_prompt(p)} for p in prompts])

    def reward(prompts, completions, **_):
        return [task.verify(by_text[p], c).reward for p, c in zip(prompts, completions)]

    per_step = args.prompts * args.n
    micro = min(args.micro_batch, per_step)
    if per_step % micro:
        raise SystemExit(f"prompts × n = {per_step} is not a multiple of --micro-batch {micro}")
    cfg = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl_out"), learning_rate=args.lr, max_steps=args.steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
        num_generations=args.n, max_completion_length=args.max_tokens, temperature=1.0, beta=0.0,
        loss_type=args.loss_type, num_iterations=1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, seed=0, max_grad_norm=1.0, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    times, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **k):
            # completions/mean_length: generated tokens per answer (EOS included), logged every step
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([t1] + times[:-1], times)]
    Path(args.out).write_text(json.dumps({"setup_seconds": setup_s, "step_seconds": steps,
                                          "samples_per_step": per_step,
                                          "gen_tokens": [m * per_step for m in lengths]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
