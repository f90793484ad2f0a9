"""Build the tiny base model of the built-in "arith" task: a char-level Llama warm-started on the "sft" split.

    python -m passk_rl.tasks.make_base [--out DIR] [--seed S] [--force]
    python -m passk_rl.tasks.make_base --commit     # build (or reuse) the seed-0 model and copy it into the package

The model every run uses (``builtin:arith-base``) is the one committed under ``passk_rl/models/arith-base``: torch
gives different floats on different CPU kinds, so a model rebuilt elsewhere is not bit-identical, and committing
the weights (2 MB) makes every machine train from the same start. ``builtin_base_model()`` checks at load that
the committed model was built from the recipe in this file (its key) and that its weights are intact (sha256).

The recipe (model size, supervised steps, data, evaluation) plus the seed determine the result: the model is
cached under ``<cache>/models/arith-base-<hash of recipe and seed>`` (``<cache>`` = ``$PASSK_RL_CACHE`` or
``~/.cache/passk_rl``) and reused when its ``COMPLETE`` marker is there (written last; the directory is built
under a temporary name and renamed into place, under a file lock, so concurrent callers build it once).

The warm start is deliberately short: the model learns the answer format and some of the arithmetic, so it
solves a fraction of held-out puzzles at pass@1 and many more at pass@16 — the room RL with a Pass@K objective
is meant to use. ``base_eval.json`` records held-out pass@1/pass@16 measured at build time (n samples per prompt,
temperature 1, unbiased estimator).

Determinism: fixed seeds for the weights, the data order and the sampled evaluation; a fixed torch thread count
and ``torch.use_deterministic_algorithms``; the same torch build on the same CPU kind gives identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from passk_rl.files import sha256_file

RECIPE_VERSION = 1
MARKER = "COMPLETE"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that shapes the base model (the cache key hashes all of it plus the seed)."""

    task_params: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ArithTask parameters
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads = 64 (a head size vLLM's CPU kernels support)
    max_position_embeddings: int = 256
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    # How many of a puzzle's correct answers the warm start ever shows (0 = all); fewer leaves more for RL.
    answers_per_puzzle: int = 0
    threads: int = 2
    eval_prompts: int = 256
    eval_n: int = 32
    eval_ks: Sequence[int] = (1, 4, 16)
    max_new_tokens: int = 24

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_ks"] = list(self.eval_ks)
        return d


def make_recipe(**overrides: Any) -> Recipe:
    names = {f.name for f in dataclasses.fields(Recipe)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"make_base: unknown recipe parameter(s) {bad}; known: {sorted(names)}")
    if "eval_ks" in overrides:
        overrides["eval_ks"] = tuple(int(k) for k in overrides["eval_ks"])
    r = Recipe(**overrides)
    if r.hidden_size % r.num_heads:
        raise ValueError(f"make_base: hidden_size {r.hidden_size} is not divisible by num_heads {r.num_heads}")
    if r.steps < 0 or r.batch_size < 1 or r.threads < 1 or r.eval_n < max(r.eval_ks):
        raise ValueError(f"make_base: need steps >= 0, batch_size >= 1, threads >= 1, eval_n >= max(eval_ks); got {r}")
    return r


def recipe_key(recipe: Recipe, seed: int) -> str:
    blob = json.dumps({"version": RECIPE_VERSION, "seed": int(seed), "recipe": recipe.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PASSK_RL_CACHE") or Path.home() / ".cache" / "passk_rl")


def base_model_dir(cache_dir: Optional[os.PathLike] = None, *, seed: int = 0, **recipe: Any) -> Path:
    """Where ``ensure_base_model`` keeps the model for this recipe and seed (it may not exist yet)."""
    r = make_recipe(**recipe)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / f"arith-base-{recipe_key(r, seed)}"


def is_complete(path: os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def ensure_base_model(cache_dir: Optional[os.PathLike] = None, *, seed: int = 0, force: bool = False,
                      log: Optional[Callable[[str], None]] = None, **recipe: Any) -> Path:
    """The cached base model's directory for (recipe, seed); builds it first when missing or ``force``.

    Safe to call from several processes at once: one builds, the others wait on the lock and reuse the result.
    """
    out = base_model_dir(cache_dir, seed=seed, **recipe)
    if is_complete(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if is_complete(out) and not force:
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_base_model(tmp, seed=seed, log=log, **recipe)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


BUILTIN_DIR = Path(__file__).resolve().parent.parent / "models" / "arith-base"
_BUILTIN_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "base_eval.json", "recipe.json")


def builtin_base_model(path: Optional[os.PathLike] = None) -> Path:
    """The committed seed-0 base model (``passk_rl/models/arith-base``), checked before use.

    Raises FileNotFoundError when it is missing and RuntimeError when it was built from another recipe than the
    one in this file or its weights do not match their recorded sha256; both say how to rebuild it.
    """
    d = Path(path) if path is not None else BUILTIN_DIR
    fix = "rebuild it with `python -m passk_rl.tasks.make_base --commit` and commit passk_rl/models/arith-base"
    meta_file = d / "passk_rl_model.json"
    if not meta_file.is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"the built-in base model is missing from {d}; {fix}")
    meta = json.loads(meta_file.read_text())
    want = recipe_key(make_recipe(), 0)
    if meta.get("key") != want:
        raise RuntimeError(f"the committed base model in {d} was built from recipe {meta.get('key')!r}, but "
                           f"make_base's recipe is now {want!r}; {fix}")
    if meta.get("sha256") != sha256_file(d / "model.safetensors"):
        raise RuntimeError(f"{d}/model.safetensors does not match its recorded sha256 (corrupted or replaced); {fix}")
    return d


def commit_base_model(src: os.PathLike, dest: Optional[os.PathLike] = None) -> Path:
    """Copy a built seed-0 model into the package (``BUILTIN_DIR``) with the sha256 of its weights."""
    src, dest = Path(src), Path(dest) if dest is not None else BUILTIN_DIR
    meta = json.loads((src / "passk_rl_model.json").read_text())
    if meta.get("seed") != 0:
        raise ValueError(f"only the seed-0 model is the built-in one; {src} has seed {meta.get('seed')}")
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _BUILTIN_FILES:
        shutil.copyfile(src / name, tmp / name)
    meta["sha256"] = sha256_file(tmp / "model.safetensors")
    (tmp / "passk_rl_model.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return builtin_base_model(dest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_determinism(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the build; the caller's settings come back after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


# --------------------------------------------------------------------------------------------- data
def sft_examples(task: Any, prompts: Sequence[Any], *, answers_per_puzzle: int, seed: int) -> List[List[str]]:
    """Per train prompt, the correct answers the warm start may show (a seeded subset when answers_per_puzzle > 0)."""
    out = []
    for p in prompts:
        sols = task.solutions(p)
        if not sols:
            raise ValueError(f"arith: train prompt {p.id!r} has no solution")
        if answers_per_puzzle > 0 and len(sols) > answers_per_puzzle:
            rng = random.Random(f"{seed}:answers:{p.id}")
            sols = sorted(rng.sample(sols, answers_per_puzzle))
        out.append(sols)
    return out


def _batch_tensors(tok: Any, prompts: Sequence[str], completions: Sequence[str]):
    """Right-padded input ids, attention mask and labels (-100 on the prompt and padding; EOS is learned)."""
    import torch

    rows, labels = [], []
    for p, c in zip(prompts, completions):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(pi + ci)
        labels.append([-100] * len(pi) + ci)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids, mask, lab


def train_sft(model: Any, tok: Any, prompt_texts: Sequence[str], answers: Sequence[Sequence[str]], *, steps: int,
              batch_size: int, lr: float, warmup_steps: int, weight_decay: float, seed: int,
              on_step: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Supervised warm start: each step draws ``batch_size`` puzzles (seeded) and one of their allowed answers.

    AdamW with linear warm-up then cosine decay to 10 % of ``lr``. Returns the per-step losses.
    """
    import torch

    rng = random.Random(f"{seed}:sft")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order: List[int] = []
    losses = []
    model.train()
    for step in range(steps):
        idx = []
        while len(idx) < batch_size:
            if not order:
                order = list(range(len(prompt_texts)))
                rng.shuffle(order)
            idx.append(order.pop())
        ids, mask, lab = _batch_tensors(tok, [prompt_texts[i] for i in idx], [rng.choice(answers[i]) for i in idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------- sampling
def sample_completions(model: Any, tok: Any, prompt_texts: Sequence[str], *, n: int, seed: int,
                       temperature: float = 1.0, max_new_tokens: int = 24, max_batch: int = 4096) -> List[List[str]]:
    """n completions per prompt, pure ancestral sampling (no top-k/top-p) like the generator's default.

    Prompts are grouped by token length so that no padding is needed; completions stop at EOS, which is not part
    of the returned text. Deterministic for a given seed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    out: List[List[str]] = [[] for _ in prompt_texts]
    by_len: Dict[int, List[int]] = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    per_chunk = max(1, max_batch // n)
    for length in sorted(by_len):
        members = by_len[length]
        for s in range(0, len(members), per_chunk):
            chunk = members[s: s + per_chunk]
            ids = torch.tensor([enc[i] for i in chunk for _ in range(n)], dtype=torch.long)
            toks = _sample(model, ids, gen=gen, temperature=temperature, max_new_tokens=max_new_tokens,
                           eos_id=tok.eos_token_id)
            for j, i in enumerate(chunk):
                for r in range(n):
                    row = toks[j * n + r]
                    out[i].append(tok.decode(row, skip_special_tokens=True))
    return out


def _sample(model: Any, ids: Any, *, gen: Any, temperature: float, max_new_tokens: int, eos_id: int) -> List[List[int]]:
    """Batched sampling with the KV cache; returns each row's generated ids up to (not including) EOS."""
    import torch
    from transformers import DynamicCache

    b = ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    cache = DynamicCache()
    generated = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            generated.append(nxt)
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1, :]
    g = torch.stack(generated, dim=1).tolist()
    rows = []
    for row in g:
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


def evaluate_passk(model: Any, tok: Any, task: Any, prompts: Sequence[Any], *, n: int, ks: Sequence[int], seed: int,
                   temperature: float = 1.0, max_new_tokens: int = 24) -> Dict[str, Any]:
    """Held-out pass@k (unbiased, mean over prompts) of ``model`` with n samples per prompt."""
    import numpy as np

    from passk_rl.estimators import pass_at_k

    texts = [task.format_prompt(p) for p in prompts]
    samples = sample_completions(model, tok, texts, n=n, seed=seed, temperature=temperature,
                                 max_new_tokens=max_new_tokens)
    counts, statuses = [], {}
    for p, group in zip(prompts, samples):
        c = 0
        for text in group:
            v = task.verify(p, text)
            statuses[v.status] = statuses.get(v.status, 0) + 1
            c += v.reward >= 1.0
        counts.append(c)
    c = np.asarray(counts)
    res = {f"pass@{k}": float(np.mean(pass_at_k(n, c, k))) for k in ks}
    res.update({"n": n, "num_prompts": len(prompts), "temperature": temperature, "verifier_status": statuses,
                "counts": c.tolist()})
    return res


# --------------------------------------------------------------------------------------------- build
def build_base_model(out_dir: os.PathLike, *, seed: int = 0, log: Optional[Callable[[str], None]] = None,
                     **recipe: Any) -> Dict[str, Any]:
    """Build the base model into ``out_dir`` (HF layout, safetensors fp32, tokenizer, generation config,
    ``base_eval.json``, ``recipe.json``, then the ``COMPLETE`` marker). Returns the base_eval record."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from passk_rl.models.tiny import build_tokenizer, tiny_llama_config
    from passk_rl.tasks.arith import ArithTask

    r = make_recipe(**recipe)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = ArithTask(**r.task_params)
    train = task.prompts("sft")  # disjoint from the RL ("train") and held-out ("test") puzzles
    test = task.prompts("test")[: r.eval_prompts]
    tok = build_tokenizer(model_max_length=r.max_position_embeddings)
    with _torch_determinism(r.threads):
        torch.manual_seed(seed)
        cfg = tiny_llama_config(len(tok), hidden_size=r.hidden_size, num_layers=r.num_layers,
                                num_heads=r.num_heads, max_position_embeddings=r.max_position_embeddings,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        answers = sft_examples(task, train, answers_per_puzzle=r.answers_per_puzzle, seed=seed)
        every = max(1, r.steps // 10)

        def on_step(step: int, loss: float) -> None:
            if (step + 1) % every == 0 or step + 1 == r.steps:
                log(f"[make_base] step {step + 1}/{r.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")

        losses = train_sft(model, tok, [task.format_prompt(p) for p in train], answers, steps=r.steps,
                           batch_size=r.batch_size, lr=r.lr, warmup_steps=r.warmup_steps,
                           weight_decay=r.weight_decay, seed=seed, on_step=on_step)
        train_s = time.perf_counter() - t0
        log(f"[make_base] evaluating held-out pass@k on {len(test)} prompts x {r.eval_n} samples")
        ev = evaluate_passk(model, tok, task, test, n=r.eval_n, ks=r.eval_ks, seed=seed + 1,
                            max_new_tokens=r.max_new_tokens)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    record = {
        "task": "arith", "task_params": r.task_params, "split": "test", "sft_puzzles": len(train),
        **{k: v for k, v in ev.items() if k != "counts"},
        "counts": ev["counts"],
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    (out / "base_eval.json").write_text(json.dumps(record, indent=1))
    (out / "recipe.json").write_text(json.dumps({"version": RECIPE_VERSION, "seed": seed, "key": recipe_key(r, seed),
                                                 "recipe": r.to_json()}, indent=1, sort_keys=True))
    (out / "passk_rl_model.json").write_text(json.dumps({"kind": "arith-base", "seed": seed,
                                                         "key": recipe_key(r, seed)}))
    (out / MARKER).write_text("ok\n")
    summary = ", ".join(f"{k}={record[k]:.3f}" for k in (f"pass@{k}" for k in r.eval_ks))
    log(f"[make_base] held-out {summary}; built in {record['total_seconds']:.0f}s")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passk_rl.tasks.make_base", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="cache directory (default: $PASSK_RL_CACHE or ~/.cache/passk_rl); "
                    "the model goes to <out>/models/arith-base-<hash>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even when a complete cached model exists")
    ap.add_argument("--commit", action="store_true", help=f"then copy the seed-0 model into {BUILTIN_DIR} (the "
                    "weights every run and test uses); commit that directory")
    args = ap.parse_args(argv)
    if args.commit and args.seed != 0:
        ap.error("--commit takes the seed-0 model only")
    path = base_model_dir(args.out, seed=args.seed)
    cached = is_complete(path) and not args.force
    path = ensure_base_model(args.out, seed=args.seed, force=args.force)
    if args.commit:
        print(f"committed {commit_base_model(path)} (now `git add` it)")
    ev = json.loads((path / "base_eval.json").read_text())
    ks = [k for k in ev if k.startswith("pass@")]
    print(f"{'reused' if cached else 'built'} {path}")
    print("held-out " + ", ".join(f"{k}={ev[k]:.3f}" for k in ks) + f" (n={ev['n']}, {ev['num_prompts']} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
