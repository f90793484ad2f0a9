"""Build the benchmark model of ``configs/bench_medium.yaml``: a randomly initialised character-level Llama of ~20 M
parameters (hidden 512, 6 layers, 8 heads of 64), made locally and deterministically (no hub, no training).

    python -m passk_rl.tasks.make_bench_model [--out DIR] [--force]

Why this size (issue 18): the toy model (0.4 M parameters) makes every step all overhead; at ~20 M parameters and
answers of up to 192 tokens, a step's time is model compute (one forward per generated token, a forward and backward
per trained token), which is the regime users train in, while this 2-core machine still runs a step in tens of
seconds. Head size 64 is one vLLM's CPU attention kernels support. Random weights are enough for a speed benchmark:
the task (``bench_text``) is one a random policy solves sometimes, so rewards vary and the update does real work;
the initializer's small logits make the policy near-uniform over the ~100 characters, so answers end after ≈ 100
tokens on average, spread up to the generation budget.

Determinism: a fixed seed and a fixed architecture give the same weights with the same torch build on the same CPU
kind (``passk_rl_model.json`` records the recipe key and the weights' sha256). The model is rebuilt when the recipe
changes (its key differs) and reused otherwise; building takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent.parent
# Where configs/bench_medium.yaml expects it (relative to the repository root; .cache/ is git-ignored).
DEFAULT_DIR = ROOT / ".cache" / "models" / "bench-medium"

RECIPE: Dict[str, Any] = {"version": 1, "seed": 0, "hidden_size": 512, "num_layers": 6, "num_heads": 8,
                          "intermediate_size": 1408, "max_position_embeddings": 512}


def recipe_key(recipe: Dict[str, Any] = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def is_current(path: os.PathLike, recipe: Dict[str, Any] = RECIPE) -> bool:
    meta = Path(path) / "passk_rl_model.json"
    try:
        return json.loads(meta.read_text()).get("key") == recipe_key(recipe) and (Path(path) / "config.json").is_file()
    except (OSError, ValueError):
        return False


def build(out_dir: os.PathLike, recipe: Dict[str, Any] = RECIPE) -> Path:
    """Write the model (HF layout, safetensors fp32, tokenizer, generation config) to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from passk_rl.checkpoint import sha256_file
    from passk_rl.models.tiny import build_tokenizer, tiny_llama_config

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = build_tokenizer(model_max_length=recipe["max_position_embeddings"])
        cfg = tiny_llama_config(len(tok), hidden_size=recipe["hidden_size"], num_layers=recipe["num_layers"],
                                num_heads=recipe["num_heads"], intermediate_size=recipe["intermediate_size"],
                                max_position_embeddings=recipe["max_position_embeddings"],
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # initialisation draws no differently, but keep the build independent of cores
        try:
            torch.manual_seed(recipe["seed"])
            model = LlamaForCausalLM(cfg).to(torch.float32)
        finally:
            torch.set_num_threads(threads)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "passk_rl_model.json").write_text(json.dumps({
            "kind": "bench-medium", "key": recipe_key(recipe), "recipe": recipe, "num_params": params,
            "sha256": sha256_file(tmp / "model.safetensors"), "torch": torch.__version__}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(out_dir: Optional[os.PathLike] = None, *, force: bool = False) -> Path:
    """The model's directory, built first when missing, built from another recipe, or ``force``."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    if force or not is_current(out):
        build(out)
    return out.resolve()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passk_rl.tasks.make_bench_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help=f"where the model goes (default {DEFAULT_DIR})")
    ap.add_argument("--force", action="store_true", help="rebuild even when a current model is there")
    args = ap.parse_args(argv)
    path = ensure(args.out, force=args.force)
    meta = json.loads((path / "passk_rl_model.json").read_text())
    print(f"{path}: {meta['num_params'] / 1e6:.1f} M parameters, recipe {meta['key']}, sha256 {meta['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
