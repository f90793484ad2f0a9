"""Evaluate models: held-out pass@k of any models on the same problems with the same sampling seeds.

``evaluate_models(models, ...)`` samples every model with a real ``GeneratorPool`` and scores it with a real
``VerifierPool`` (one private local Ray cluster for all models; models of one architecture share one engine whose
weights are swapped in place), reduces each through the evaluation pipeline (``passk_rl.evaluation``: unbiased
pass@k, Chen et al. 2021, 95 % bootstrap intervals over problems) and writes ``<out>/<label>.json`` per model,
``<out>/summary.json`` (every model's pass@k and its paired change against the first model) and
``<out>/pass_at_k.png``. Comparing methods over several training seeds is ``python -m passk_rl.experiment``'s
job (the same pipeline, intervals over seeds and problems).

Command line (run from the repository root)::

    python -m passk_rl.evaluate --model PATH_OR_RUN_DIR [--model ...] [--label NAME ...] --task arith \\
        [--task-params YAML] [--split test] [--num-prompts N] --n 256 --k 1,2,4,8,16,32,64,128 \\
        [--temperature 1.0] [--max-tokens 32] [--seed 0] [--out DIR]
    python -m passk_rl.evaluate plot-run RUN_DIR

A model is an HF directory, a run directory (its ``final_model/`` is used) or a built-in model
(``passk_rl.models.resolve``). Every model is sampled with the same seed (common random numbers), so differences
between models carry less sampling noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from passk_rl import evaluation
from passk_rl.models.resolve import resolve_model

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)


# ===================================================================================== model evaluation
def parse_ks(text: str | Sequence[int]) -> List[int]:
    """"1,2,4" (or a list) → [1, 2, 4]; sorted, unique, each ≥ 1 (ValueError naming the bad entry)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            k = int(s)
        except ValueError:
            raise ValueError(f"k list: {s!r} is not an integer (expected e.g. 1,2,4,8)") from None
        if k < 1:
            raise ValueError(f"k list: k={k} must be >= 1")
        out.append(k)
    if not out:
        raise ValueError(f"k list: no k values in {text!r}")
    return sorted(set(out))


def check_ks(n: int, ks: Sequence[int]) -> None:
    """Raise ValueError when a requested k cannot be estimated from n samples per problem."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample per problem")
    bad = [k for k in ks if k > n]
    if bad:
        raise ValueError(f"k={bad[0]} exceeds n={n}: the unbiased pass@k estimator needs k <= n samples per "
                         f"problem (raise --n to at least {max(bad)} or drop k > {n})")


@dataclass(frozen=True)
class ModelRef:
    spec: str  # as given
    path: str  # the HF directory to load
    label: str
    run_dir: Optional[str] = None  # set when spec was a run directory


def _safe_label(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+=@-]+", "_", label).strip("._")
    if not s:
        raise ValueError(f"label {label!r} has no usable characters for a file name")
    return s


def default_label(spec: str, run_dir: Optional[str]) -> str:
    if spec.startswith("builtin:"):
        return spec.split(":", 1)[1]
    return Path(run_dir or spec.rstrip("/")).name or "model"


def resolve_models(specs: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[ModelRef]:
    """Resolve every model (and its label) before anything starts; raise on the first bad one."""
    if not specs:
        raise ValueError("no --model given")
    if labels and len(labels) != len(specs):
        raise ValueError(f"{len(labels)} --label values for {len(specs)} --model values; give one label per model "
                         f"or none")
    refs, seen = [], set()
    for i, spec in enumerate(specs):
        m = resolve_model(spec, key="--model")
        path, run_dir = m.path, m.run_dir
        label = _safe_label(labels[i] if labels else default_label(spec, run_dir))
        if label in seen:
            if labels:
                raise ValueError(f"label {label!r} is given twice")
            j = 2
            while f"{label}-{j}" in seen:
                j += 1
            label = f"{label}-{j}"
        seen.add(label)
        refs.append(ModelRef(spec=spec, path=path, label=label, run_dir=run_dir))
    return refs


def init_local_ray(num_cpus: int = 4) -> bool:
    """Start a private local Ray cluster unless one is initialised already; True when this call started it.

    Unlike the trainer it never joins a Ray job's cluster: ``evaluate_models`` promises one private cluster."""
    from cluster.ray_init import start_ray

    return start_ray(address="local", num_cpus=num_cpus, log_to_driver=False, join_ray_job=False, log=_log)


def _log(msg: str) -> None:
    print(f"[passk_rl.evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate_models(models: Sequence[str], *, labels: Optional[Sequence[str]] = None, task: str = "arith",
                    task_params: Optional[Mapping[str, Any]] = None, split: str = "test",
                    num_prompts: Optional[int] = None, n: int, ks: Sequence[int] = DEFAULT_KS,
                    temperature: float = 1.0, max_tokens: int = 32, seed: int = 0,
                    out_dir: str | Path = "eval_out", num_engines: int = 1, kv_cache_gib: float = 0.5,
                    max_model_len: int = 256, dtype: str = "float32", max_num_seqs: int = 256,
                    verifier_workers: int = 1,
                    verifier_timeout_s: float = 10.0, n_boot: int = 1000, ray_cpus: int = 4, plot: bool = True,
                    keep_samples: bool = False, share_engine: bool = True,
                    log: Callable[[str], None] = _log) -> Dict[str, Dict[str, Any]]:
    """Evaluate each model on the same prompts with the same sampling seed; ``{label: result}``.

    Each result is ``passk_rl.evaluation.score``'s record plus "label", "model" (spec), "model_path", "run_dir",
    "task", "task_params", "split", "temperature", "max_tokens", "seed", "seconds"; it is also written to
    ``<out_dir>/<label>.json``, and every model's paired change against the first to ``<out_dir>/summary.json``. With ``plot``, all curves go to ``<out_dir>/pass_at_k.png``; with ``keep_samples``
    the results (and files) also hold every completion with its verdict. With ``share_engine`` (default) models of
    one architecture are evaluated on one engine, each loaded in place; otherwise each gets a fresh engine.
    Every argument is checked (k ≤ n, models exist, task/split valid) before Ray or any engine starts.
    """
    from passk_rl.tasks import make_task

    ks = parse_ks(ks)
    check_ks(n, ks)
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts}: must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (pass@k of greedy decoding is pass@1)")
    refs = resolve_models(models, labels)
    params = dict(task_params or {})
    try:
        task_obj = make_task(task, **params)
    except TypeError as e:
        raise ValueError(f"task parameters for {task!r}: {e}") from None
    prompts = task_obj.prompts(split)
    if not prompts:
        raise ValueError(f"task {task!r} has no prompts in split {split!r}")
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from transformers import AutoTokenizer

    from actors.generator import GeneratorPool
    from actors.verifier import VerifierPool

    from cluster.weight_sync import ShmSafetensorsTransport, checkpoint_params, handle_for_model_dir

    started = init_local_ray(ray_cpus)
    results: Dict[str, Dict[str, Any]] = {}
    verifier = gen = None
    # Models of one architecture share one engine: the next model's weights are loaded in place (the same
    # validated reload a training sync uses), which saves an engine start (~20 s) per model. Sampling depends
    # only on the weights and the per-request seeds, so a model evaluated either way gives the same samples.
    transport = ShmSafetensorsTransport(run_name=f"evaluate-{os.getpid()}", keep_last=1)
    engine_model = engine_arch = None
    try:
        verifier = VerifierPool(task, params, num_workers=verifier_workers, timeout_s=verifier_timeout_s,
                                num_cpus_per_worker=0.25)
        for i, ref in enumerate(refs):
            t0 = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(ref.path)
            arch = (Path(ref.path, "config.json").read_text(), checkpoint_params(ref.path))
            if gen is not None and (not share_engine or arch != engine_arch):
                gen.shutdown()
                gen = None
            if gen is None:
                log(f"{ref.label}: starting an engine on {ref.path}")
                gen = GeneratorPool(num_engines, dict(model_path=ref.path, device="cpu", seed=seed,
                                                      kv_cache_bytes=int(kv_cache_gib * 2**30),
                                                      max_model_len=max_model_len, dtype=dtype,
                                                      max_num_seqs=max_num_seqs, transport=transport),
                                    device="cpu", num_cpus_per_engine=0.5)
                engine_model, engine_arch = ref.path, arch
            elif ref.path != engine_model:
                gen.sync_weights(handle_for_model_dir(ref.path, step=i))
                engine_model = ref.path
            res = evaluation.score(gen, verifier, task_obj, prompts, tokenizer=tokenizer, n=n, ks=ks,
                                   temperature=temperature, max_tokens=max_tokens, seed=seed, n_boot=n_boot,
                                   keep_samples=keep_samples)
            res.update({"label": ref.label, "model": ref.spec, "model_path": ref.path, "run_dir": ref.run_dir,
                        "task": task, "task_params": params, "split": split, "temperature": temperature,
                        "max_tokens": max_tokens, "seed": seed, "seconds": time.perf_counter() - t0})
            (out / f"{ref.label}.json").write_text(json.dumps(res, indent=2))
            results[ref.label] = res
            log(f"{ref.label}: {len(prompts)} prompts × n={n} in {res['seconds']:.0f}s  " + "  ".join(
                f"pass@{k}={res['pass_at_k'][str(k)]['mean']:.3f}" for k in ks))
    finally:
        if gen is not None:
            gen.shutdown()
        if verifier is not None:
            verifier.shutdown()
        transport.cleanup(keep_last=0)
        if started:
            ray.shutdown()
    first = next(iter(results.values()))
    summary = {"models": {label: {"model": r["model"], "pass_at_k": r["pass_at_k"]} for label, r in results.items()},
               "change_vs": first["label"],
               "change": {label: evaluation.change(first, r, n_boot=n_boot, seed=seed)
                          for label, r in results.items() if r is not first}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for label, ch in summary["change"].items():
        log(f"{label} − {first['label']} (paired, same prompts and sampling seeds): " + "  ".join(
            f"pass@{k} {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" for k, v in ch.items()))
    if plot:
        from passk_rl.plots import plot_pass_at_k

        path = plot_pass_at_k(results, out / "pass_at_k.png",
                              title=f"{task}/{split}: pass@k ({len(prompts)} problems, n={n}, T={temperature})")
        log(f"wrote {path}")
    return results


# ================================================================================================== CLI
def _yaml_mapping(text: Optional[str], what: str) -> Dict[str, Any]:
    import yaml

    if not text:
        return {}
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: not valid YAML: {e}") from None
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{what}: expected a mapping like '{{num_count: 3}}', got {v!r}")
    return v


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m passk_rl.evaluate",
                                description="Held-out pass@k of one or more models on the same problems and sampling "
                                            "seeds, with each model's paired change against the first --model "
                                            "(subcommand: plot-run RUN_DIR). Methods over several training "
                                            "seeds: python -m passk_rl.experiment.")
    p.add_argument("--model", action="append", required=True,
                   help="HF model dir, run dir (uses its final_model/) or builtin:arith-base; repeatable")
    p.add_argument("--label", action="append", default=None, help="name per --model (default: dir name)")
    p.add_argument("--task", default="arith")
    p.add_argument("--task-params", default=None, help="YAML mapping of task parameters, e.g. '{seed: 0}'")
    p.add_argument("--split", default="test")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts of the split (default: all)")
    p.add_argument("--n", type=int, default=256, help="samples per prompt")
    p.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="comma-separated k values (each <= n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    p.add_argument("--out", default="eval_out", help="output directory")
    p.add_argument("--num-engines", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine decodes at once")
    p.add_argument("--verifier-workers", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plot-run":
            from passk_rl.plots import plot_run

            if len(argv) != 2:
                print("usage: python -m passk_rl.evaluate plot-run RUN_DIR", file=sys.stderr)
                return 2
            for p in plot_run(argv[1]):
                print(f"wrote {p}")
            return 0
        a = _eval_parser().parse_args(argv)
        ks = parse_ks(a.k)
        check_ks(a.n, ks)  # before anything starts
        evaluate_models(a.model, labels=a.label, task=a.task, task_params=_yaml_mapping(a.task_params, "--task-params"),
                        split=a.split, num_prompts=a.num_prompts, n=a.n, ks=ks, temperature=a.temperature,
                        max_tokens=a.max_tokens, seed=a.seed, out_dir=a.out, num_engines=a.num_engines,
                        kv_cache_gib=a.kv_cache_gib, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                        verifier_workers=a.verifier_workers, n_boot=a.n_boot, plot=not a.no_plot)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # vLLM spawns processes: the entry point must be guarded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
