"""TRL's GRPOTrainer on passk-rl's default work, for benchmarks/bench_trl.py (runs in a Python that has `trl`).

    python benchmarks/_trl_grpo_worker.py --model DIR --steps N --prompts 64 --n 16 --max-tokens 32 --lr 3e-4 --out F

One optimizer step = ``prompts`` × ``n`` completions generated in one round with HF ``generate`` (TRL's default
without vLLM), rewarded by passk-rl's arith verifier, GRPO loss (beta 0). Writes per-step wall times as JSON.
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

    torch.set_num_threads(2)
    task = make_task("arith")
    prompts = task.prompts("train")
    by_text = {task.format_prompt(p): p for p in prompts}
    ds = Dataset.from_list([{"prompt": task.format_prompt(p)} for p in prompts])

    def reward(prompts, completions, **_):
        return [task.verify(by_text[p], c).reward for p, c in zip(prompts, completions)]

    per_step = args.prompts * args.n
    cfg = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl_out"), learning_rate=args.lr, max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.n, max_completion_length=args.max_tokens, temperature=1.0, beta=0.0,
        loss_type="grpo", num_iterations=1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, seed=0, max_grad_norm=1.0, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([t1] + times[:-1], times)]
    Path(args.out).write_text(json.dumps({"setup_seconds": setup_s, "step_seconds": steps,
                                          "samples_per_step": per_step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
