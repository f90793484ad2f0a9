"""Seconds and bytes per weight sync against model size, file transport vs collective transport, one invocation.

    python benchmarks/bench_sync.py                          # 0.5M, 25M, 125M parameters; 1 engine; 3 syncs each
    python benchmarks/bench_sync.py --sizes 0.5M,25M --engines 2 --syncs 5 --bucket-mb 64
    python benchmarks/bench_sync.py --sizes 0.5B             # ~2 GB of fp32 weights: needs ~10 GB of free RAM

Set-up per size: a random tiny-Llama (passk_rl.models.tiny) of that size, its HF model in this process standing
in for the learner's rank 0 (fp32, the training dtype), and ``--engines`` real vLLM engines on ``--device``.
Every timed sync first nudges every weight (so each sync carries new values), then delivers them:

* file — ``ShmSafetensorsTransport``: write ``model.safetensors`` under ``--root`` (/dev/shm), then every engine
  ``reload_weights(weights_path=...)`` (in parallel);
* collective — ``CollectiveTransport``: the sender streams ``--bucket-mb`` buckets over the device's backend
  (gloo on cpu) while every engine receives and loads them in place (``reload_weights(weights_iterator=...)``).

Each transport has one untimed warm-up sync (the collective one forms its group there); the timed syncs alternate
file / collective so that load from other jobs hits both alike — compare the ratio, not absolute seconds across
runs. After the last sync of each transport the engines' logprobs of a fixed completion are checked against the
HF model (``check`` column: largest difference). ``bytes`` is the tensor payload of one version; the file column
also shows what lands on the filesystem. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# hidden size, layers (head dim 64: the sizes vLLM's CPU attention supports); MLP is 4 × hidden
SIZES: Dict[str, Tuple[int, int]] = {"0.5M": (128, 2), "25M": (512, 6), "125M": (768, 13), "0.5B": (1536, 13)}
PROMPT, COMPLETION = "The quick brown fox ", "jumps over the lazy dog."


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5M,25M,125M", help=f"comma-separated, from {list(SIZES)}")
    ap.add_argument("--engines", type=int, default=1, help="vLLM engines receiving every sync")
    ap.add_argument("--syncs", type=int, default=3, help="timed syncs per transport and size")
    ap.add_argument("--bucket-mb", type=float, default=0.0,
                    help="collective bucket size (sync.bucket_mb; 0: the backend's default, 4 MB on cpu)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default="/dev/shm/passk_rl_bench", help="where the file transport writes")
    ap.add_argument("--kv-cache-mb", type=int, default=64)
    args = ap.parse_args()
    bad = [s for s in args.sizes.split(",") if s not in SIZES]
    if bad:
        ap.error(f"unknown size(s) {bad}; known: {list(SIZES)}")
    return args


def _logprobs(hf: Any, p: List[int], c: List[int]) -> List[float]:
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([p + c])).logits[0].float(), -1)
    return lp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].tolist()


def bench_size(name: str, args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import VLLMGenerator
    from cluster.transports import make_transport
    from cluster.weight_sync import ShmSafetensorsTransport
    from passk_rl.models.tiny import build_random_model

    hidden, layers = SIZES[name]
    t0 = time.perf_counter()
    path = build_random_model(tmp / name, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in hf.parameters())
    tok = AutoTokenizer.from_pretrained(path)
    p_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    c_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    collective = make_transport("collective", device=args.device, bucket_mb=args.bucket_mb, timeout_s=600,
                                run_name=f"bench{os.getpid()}")
    shm = ShmSafetensorsTransport(root=args.root, run_name=f"bench{os.getpid()}_{name}", keep_last=1,
                                  verify_checksum=True)
    print(f"[bench_sync] {name}: {params / 1e6:.1f} M parameters; starting {args.engines} engine(s)", flush=True)
    engines = [VLLMGenerator(str(path), device=args.device, seed=0, transport=collective,
                             kv_cache_bytes=args.kv_cache_mb * 2**20, max_model_len=256)
               for _ in range(args.engines)]
    setup_s = time.perf_counter() - t0
    collective.serve(receivers=args.engines * 1, host="127.0.0.1")

    def on_engines(fn) -> None:
        errors: List[BaseException] = []

        def run(g):
            try:
                fn(g)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(g,)) for g in engines]
        [t.start() for t in threads]
        [t.join() for t in threads]
        if errors:
            raise errors[0]

    def nudge(seed: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        return {k: v.detach() for k, v in hf.state_dict().items()}

    def file_sync(step: int) -> Dict[str, float]:
        sd = nudge(step)
        t = time.perf_counter()
        handle = shm.publish(sd, step=step)
        t1 = time.perf_counter()
        on_engines(lambda g: shm.apply(g.llm, handle, expected_params=g.expected_params,
                                       optional_params=g.optional_params))
        return {"publish": t1 - t, "total": time.perf_counter() - t, "bytes": handle.nbytes,
                "file_bytes": (shm.step_dir(step) / "model.safetensors").stat().st_size}

    def collective_sync(step: int) -> Dict[str, float]:
        sd = nudge(step)
        handle = collective.pending_handle(step)
        t = time.perf_counter()
        box: Dict[str, Any] = {}
        receivers = threading.Thread(target=lambda: box.update(ok=on_engines(lambda g: g.sync_weights(handle))))
        receivers.start()
        published = collective.publish(sd, step=step)
        t1 = time.perf_counter()
        receivers.join()
        if "ok" not in box:
            raise RuntimeError("an engine failed to receive (see its error above)")
        return {"publish": t1 - t, "total": time.perf_counter() - t, "bytes": published.nbytes, "file_bytes": 0}

    def check() -> float:
        want = torch.tensor(_logprobs(hf, p_ids, c_ids))
        return max(float((torch.tensor(g.score([p_ids], [c_ids])[0]) - want).abs().max()) for g in engines)

    rows: Dict[str, List[Dict[str, float]]] = {"file": [], "collective": []}
    checks: Dict[str, float] = {}
    try:
        file_sync(1)  # warm-up: page cache, first file
        collective_sync(2)  # warm-up: forms the group
        step = 3
        for _ in range(args.syncs):
            rows["file"].append(file_sync(step))
            checks["file"] = check()
            rows["collective"].append(collective_sync(step + 1))
            checks["collective"] = check()
            step += 2
    finally:
        for g in engines:
            g.shutdown()
        collective.close()
        shm.cleanup(keep_last=0)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    return {"size": name, "params": params, "setup_s": setup_s, "med": med, "checks": checks,
            "bucket_mb": collective.bucket_bytes / 2**20}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for name in args.sizes.split(","):
            results.append(bench_size(name, args, Path(tmp)))
            r = results[-1]
            print(f"[bench_sync] {name}: file {r['med']['file']['total']:.3f}s, collective "
                  f"{r['med']['collective']['total']:.3f}s (setup {r['setup_s']:.0f}s)", flush=True)
    print(f"\nweight sync, {args.engines} engine(s) on {args.device}, median of {args.syncs} syncs per transport, "
          f"collective buckets of {results[0]['bucket_mb']:g} MB; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    head = (f"{'size':>6} {'params':>9} {'payload MB':>10} | {'file s':>8} {'(write)':>8} {'file MB/s':>9} "
            f"{'on fs MB':>8} | {'coll. s':>8} {'coll MB/s':>9} | {'file/coll':>9} | {'check file':>10} "
            f"{'check coll':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        f, c = r["med"]["file"], r["med"]["collective"]
        mb = c["bytes"] / 2**20
        print(f"{r['size']:>6} {r['params'] / 1e6:>8.1f}M {mb:>10.1f} | {f['total']:>8.3f} {f['publish']:>8.3f} "
              f"{mb / f['total']:>9.1f} {f['file_bytes'] / 2**20:>8.1f} | {c['total']:>8.3f} {mb / c['total']:>9.1f} | "
              f"{f['total'] / c['total']:>8.2f}x | {r['checks']['file']:>10.2g} {r['checks']['collective']:>10.2g}")


if __name__ == "__main__":
    main()
