"""The accelerator check behind scripts/device_check.sh (issue 19): what can be tested on a GPU machine that has
PyTorch but maybe no vLLM, no DeepSpeed, no network and no package registry.

Checks (each ends as pass / fail / skipped, with the reason and its figures):

1. ``environment`` — torch, CUDA devices, NCCL, and which optional packages import (DeepSpeed, vLLM, torch_npu).
2. ``nccl_stream`` — the learner → engine weight stream of ``cluster/collective.py`` (``WeightSender`` in one
   process, ``WeightReceiver`` in another, the driver serving the store as ``CollectiveTransport.serve`` does) over
   NCCL: every tensor arrives bit-exact, the sampled checksums agree, and the throughput is printed. Two GPUs:
   one process on each. One GPU: tried anyway, although NCCL normally refuses two ranks on one device ("Duplicate
   GPU detected"); the report then says what NCCL answered. Without CUDA: the same stream over gloo on the CPU, so
   the code path is at least exercised.
3. ``learner_update`` — one update of the real ``LearnerWorker`` (DeepSpeed ZeRO-2, one rank, plain SGD, the loss of
   ``passk_rl/losses.py``) on a fixed batch of a tiny random Llama, on CPU and on CUDA, each in its own process
   (DeepSpeed picks its accelerator at import): the loss agrees to 1e-5 relative and the weight update to 1e-3
   relative (L2). Both sides compute in float32 (TF32 off), so they differ only by summation order, ~1e-6 per op;
   1e-3 is ample for two layers forward and backward, and a wrong loss, device mix-up or dropped gradient gives
   O(1). Without DeepSpeed: the same loss function and update on the HF model in plain torch.
4. ``bf16_speed`` — a Qwen2.5-0.5B-shaped model (random weights) in bf16 with 512-token answers: the learner's update
   against a bare torch loop doing the same update on the same GPU (trained tokens/s, ratio, peak memory), and their
   first-step gradient norms agree to 5 % (bf16 against fp32 weights under autocast).
5. ``dry_run`` — ``python -m passk_rl.launch --config X --dry-run`` for every config in configs/ that names
   cluster.device cuda or npu (exit 0: the plan fits; 3: it does not; anything else fails).

Writes ``device_check.json`` and ``device_check.txt`` under ``$OUT`` when set, else ``./device_check_out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOSS_RTOL, UPDATE_RTOL = 1e-5, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- environment
def check_environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count(),
            "torch_cuda": torch.version.cuda, "nccl_available": torch.distributed.is_nccl_available()}
    if info["cuda_available"]:
        info["device_names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 - informational
            info["nccl_version"] = f"unknown ({e})"
    for mod in ("deepspeed", "vllm", "torch_npu", "transformers", "safetensors", "yaml"):
        info[f"has_{mod}"] = _have(mod)
    return {"status": "pass", "figures": info}


# ------------------------------------------------------------------------------------------- the stream
def _state_dict(seed: int, megabytes: float):
    """Mixed dtypes and sizes as a model has them: big matrices, small vectors, a bf16 tensor, an empty one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = max(1, int(megabytes * 2**20 / 4 / 4096))
    return {"embed.weight": torch.randn(n, 4096, generator=g),
            "layers.0.norm.weight": torch.randn(4096, generator=g).to(torch.bfloat16),
            "layers.0.q_proj.bias": torch.randn(333, generator=g),
            "layers.0.mlp.weight": torch.randn(max(1, n // 2), 4096, generator=g).to(torch.bfloat16),
            "empty": torch.ones(0),
            "lm_head.weight": torch.randn(max(1, n // 4), 4096, generator=g)}


def _sender(rdzv: dict, device: str, bucket_bytes: int, megabytes: float, q) -> None:
    try:
        import torch

        from cluster.weight_stream import Rendezvous, WeightSender

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        sd = {k: v.to(device) for k, v in _state_dict(0, megabytes).items()}
        sender = WeightSender(Rendezvous.from_dict(rdzv), device=device)
        t0 = time.perf_counter()
        result = sender.send_state_dict(sd, step=1, bucket_bytes=bucket_bytes)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        q.put({"role": "sender", "ok": True, "seconds": time.perf_counter() - t0, **result})
        sender.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put({"role": "sender", "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


def _receiver(rdzv: dict, device: str, megabytes: float, q) -> None:
    try:
        import torch

        from cluster.weight_stream import Rendezvous, WeightReceiver

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        want = _state_dict(0, megabytes)
        got = {}
        receiver = WeightReceiver(Rendezvous.from_dict(rdzv), device=device)
        t0 = time.perf_counter()
        report = receiver.receive(lambda it: got.update({k: v.to("cpu", copy=True) for k, v in it}),
                                  expected={k: tuple(v.shape) for k, v in want.items()})
        seconds = time.perf_counter() - t0
        exact = list(got) == list(want) and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                                for k in want)
        q.put({"role": "receiver", "ok": bool(report.get("ok")), "bit_exact": exact, "seconds": seconds,
               **{k: report.get(k) for k in ("checksum", "bytes", "error", "weights")}})
        receiver.close()
    except BaseException as e:  # noqa: BLE001
        q.put({"role": "receiver", "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


def check_stream(env: dict, *, megabytes: float, timeout_s: float) -> dict:
    from cluster.transports import make_transport

    cuda = env["cuda_available"] and env["nccl_available"]
    if cuda:
        n = env["cuda_devices"]
        devices = ("cuda:0", "cuda:1") if n >= 2 else ("cuda:0", "cuda:0")
        kind, note = "cuda", ("one process per GPU" if n >= 2 else
                              "one GPU: both ranks on cuda:0 (NCCL usually refuses this: 'Duplicate GPU')")
    else:
        devices, kind = ("cpu", "cpu"), "cpu"
        megabytes = min(megabytes, 16.0)
        note = ("CUDA absent" if not env["cuda_available"] else "NCCL absent") + \
               ": the same stream over gloo on the CPU instead (the NCCL path was NOT checked)"
    tr = make_transport("collective", device=kind, timeout_s=timeout_s, run_name="device_check")
    rdzv = tr.serve(receivers=1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(rdzv, devices[0], tr.bucket_bytes, megabytes, q)),
             ctx.Process(target=_receiver, args=(rdzv, devices[1], megabytes, q))]
    for p in procs:
        p.start()
    out = {}
    deadline = time.time() + timeout_s + 30
    try:
        while len(out) < 2 and time.time() < deadline:
            try:
                r = q.get(timeout=1)
                out[r["role"]] = r
            except Exception:  # noqa: BLE001 - queue.Empty: poll again
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        tr.close()
    s, r = out.get("sender", {}), out.get("receiver", {})
    figures = {"backend": tr.backend, "devices": list(devices), "bucket_bytes": tr.bucket_bytes, "note": note,
               "sender": {k: v for k, v in s.items() if k != "trace"},
               "receiver": {k: v for k, v in r.items() if k != "trace"}}
    if s.get("ok") and r.get("ok") and r.get("bit_exact") and s.get("checksum") == r.get("checksum"):
        nbytes = r.get("bytes") or 0
        figures["GB_per_s"] = round(nbytes / max(r["seconds"], 1e-9) / 1e9, 3)
        return {"status": "pass" if cuda else "skipped", "figures": figures,
                "reason": None if cuda else note}
    why = s.get("error") or r.get("error") or ("timed out" if len(out) < 2 else
                                               "received tensors or checksum differ from what was sent")
    if cuda and devices[0] == devices[1] and "Duplicate GPU" in why:
        # NCCL never puts two ranks of one communicator on one device: a one-GPU machine cannot run this check
        return {"status": "skipped", "figures": figures,
                "reason": "one GPU: NCCL refuses two ranks on one device ('Duplicate GPU detected'); needs 2 GPUs"}
    return {"status": "fail", "figures": figures, "reason": why,
            "trace": (s.get("trace") or "") + (r.get("trace") or "")}


# ------------------------------------------------------------------------------------------- learner update
def _fixed_batch(tok):
    texts = [("12+7=", "19", 1.0), ("3*4=", "12", -0.5), ("The cat ", "sat on the mat.", 0.8), ("9-5=", "4", -1.2)]
    return [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"],
             "response_token_ids": tok(r, add_special_tokens=False)["input_ids"], "advantage": a}
            for p, r, a in texts]


LR = 0.05


def _update_deepspeed(model_path: str, device: str, out: str) -> None:
    """One LearnerWorker step (its own process: DeepSpeed chooses the accelerator at import)."""
    import torch
    from transformers import AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from actors.learner_engine import LearnerOptions, LearnerWorker

    opts = LearnerOptions.from_flat(zero_stage=2, optimizer="sgd", lr=LR, micro_batch_size=2, seed=0, grad_clip=1e9)
    w = LearnerWorker(model_path, opts, device=device, world_size=1, master_port=_free_port())
    before = w.gather_state_dict()
    metrics = w.train_step(_fixed_batch(AutoTokenizer.from_pretrained(model_path)), step=1)
    after = w.gather_state_dict()
    torch.save({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                "update": {k: after[k] - before[k] for k in after}}, out)
    w.shutdown()


def _update_torch(model_path: str, device: str) -> dict:
    """The same update without DeepSpeed: HF model, passk_rl.losses.policy_loss, plain SGD."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from passk_rl.losses import policy_loss, token_logprobs

    torch.backends.cuda.matmul.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    batch = _fixed_batch(tok)
    T = max(len(s["response_token_ids"]) for s in batch)
    L = max(len(s["prompt_token_ids"]) + len(s["response_token_ids"]) for s in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    attn = torch.zeros_like(ids)
    tgt = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T)
    pos = torch.zeros(len(batch), T, dtype=torch.long)
    for i, s in enumerate(batch):
        p, r = s["prompt_token_ids"], s["response_token_ids"]
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        tgt[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        pos[i, :len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
    ids, attn, tgt, mask, pos = (t.to(device) for t in (ids, attn, tgt, mask, pos))
    adv = torch.tensor([s["advantage"] for s in batch], device=device)
    logits = model(input_ids=ids, attention_mask=attn).logits
    logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    lp = token_logprobs(logits, tgt)
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, num_seqs=len(batch), num_tokens=float(mask.sum()),
                          max_len=float(T))
    loss.backward()
    update = {k: (-LR * p.grad).detach().cpu() for k, p in model.named_parameters()}
    gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    return {"loss": float(loss), "grad_norm": gn, "update": update}


def _compare(a: dict, b: dict) -> dict:
    import torch

    loss_rel = abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12)
    num = sum(((a["update"][k].double() - b["update"][k].double()) ** 2).sum() for k in a["update"])
    den = sum((a["update"][k].double() ** 2).sum() for k in a["update"])
    upd_rel = float(torch.sqrt(num / max(den, 1e-300)))
    return {"loss_cpu": a["loss"], "loss_cuda": b["loss"], "loss_rel_diff": loss_rel,
            "grad_norm_cpu": a["grad_norm"], "grad_norm_cuda": b["grad_norm"], "update_rel_l2_diff": upd_rel,
            "tolerances": {"loss_rel": LOSS_RTOL, "update_rel_l2": UPDATE_RTOL}}


def check_learner_update(env: dict, workdir: Path) -> dict:
    from passk_rl.models.tiny import build_random_model

    model = str(build_random_model(workdir / "tiny", seed=0))
    cuda = env["cuda_available"]
    if env["has_deepspeed"]:
        path = "deepspeed LearnerWorker (ZeRO-2, 1 rank, SGD)"
        results, procs = {}, {}
        # both devices at once (separate processes, separate ports): half the wall time of the slow part
        for dev in ("cpu", "cuda") if cuda else ("cpu",):
            out = workdir / f"update_{dev}.pt"
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.device_check import "
                    f"_update_deepspeed; _update_deepspeed({model!r}, {dev!r}, {str(out)!r})")
            procs[dev] = (subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), out)
        import torch

        for dev, (proc, out) in procs.items():
            try:
                log, _ = proc.communicate(timeout=150)
            except subprocess.TimeoutExpired:
                proc.kill()
                log = proc.communicate()[0]
            if proc.returncode != 0:
                for other, _ in procs.values():
                    other.kill()
                return {"status": "fail", "reason": f"the {dev} learner step failed (exit {proc.returncode})",
                        "figures": {"path": path}, "trace": (log or "")[-4000:]}
            results[dev] = torch.load(out)
    else:
        path = "plain torch (DeepSpeed absent): HF model + passk_rl.losses.policy_loss + SGD"
        results = {dev: _update_torch(model, dev) for dev in (("cpu", "cuda") if cuda else ("cpu",))}
    own = {}
    if env["has_deepspeed"]:
        # the plain-torch reference against the learner on the CPU: the fallback path computes the same loss
        ref = _update_torch(model, "cpu")
        own = {"torch_reference_loss_rel_diff": abs(ref["loss"] - results["cpu"]["loss"]) /
               max(abs(results["cpu"]["loss"]), 1e-12),
               "torch_reference_update_rel_l2_diff": _compare(results["cpu"], ref)["update_rel_l2_diff"]}
    if not cuda:
        return {"status": "skipped", "reason": "CUDA absent: only the CPU half ran",
                "figures": {"path": path, "loss_cpu": results["cpu"]["loss"],
                            "grad_norm_cpu": results["cpu"]["grad_norm"], **own}}
    fig = {"path": path, **_compare(results["cpu"], results["cuda"]), **own}
    ok = fig["loss_rel_diff"] <= LOSS_RTOL and fig["update_rel_l2_diff"] <= UPDATE_RTOL
    return {"status": "pass" if ok else "fail", "figures": fig,
            "reason": None if ok else "CUDA and CPU disagree beyond the stated tolerances"}


# ------------------------------------------------------------------------------------------- bf16 learner speed
BENCH = dict(seqs=32, prompt=256, response=512, micro=8, steps=5)


def check_bf16_speed(env: dict, workdir: Path) -> dict:
    """benchmarks/learner_gpu.py's default comparison: the learner against a bare torch loop on this GPU."""
    if not env["cuda_available"]:
        return {"status": "skipped", "reason": "CUDA absent"}
    from benchmarks.learner_gpu import QWEN25_05B, build_model, compare

    path = workdir / "qwen2.5-0.5b-shape"
    n_params = build_model(path, QWEN25_05B)
    figures = {"model": f"Qwen2 (Qwen2.5-0.5B shape, tied), {n_params / 1e6:.0f} M parameters, bf16",
               "batch": f"{BENCH['seqs']} sequences × ({BENCH['prompt']} prompt + {BENCH['response']} response) "
                        f"tokens, micro-batch {BENCH['micro']}"}
    if not env["has_deepspeed"]:
        return {"status": "skipped", "reason": "DeepSpeed absent: the learner cannot run", "figures": figures}
    try:
        fig = compare(path, BENCH, ["default"], timeout=240)
    except RuntimeError as e:
        return {"status": "fail", "reason": str(e).splitlines()[0], "figures": figures, "trace": str(e)[-4000:]}
    figures.update(learner=fig["default"], bare=fig["bare"], learner_vs_bare=fig["default"]["vs_bare"],
                   grad_norm_rel_diff=fig["default"]["grad_norm_rel_diff_vs_bare"])
    # same weights, batch and loss: the first step's gradient norm (before any update) agrees to bf16 precision
    # (a dropped micro-batch, a wrong normaliser or a dtype mix-up moves it by O(1))
    ok = figures["grad_norm_rel_diff"] <= 0.05 and math.isfinite(fig["default"]["grad_norm_first"])
    return {"status": "pass" if ok else "fail", "figures": figures,
            "reason": None if ok else "the learner's first gradient norm differs from the bare loop's by > 5 %"}


# ------------------------------------------------------------------------------------------- dry runs
def check_dry_runs() -> dict:
    import yaml

    rows, bad = [], []
    for cfg in sorted((ROOT / "configs").rglob("*.yaml")):
        try:
            device = ((yaml.safe_load(cfg.read_text()) or {}).get("cluster") or {}).get("device", "cpu")
        except yaml.YAMLError:
            continue
        if device not in ("cuda", "npu"):
            continue
        r = subprocess.run([sys.executable, "-m", "passk_rl.launch", "--config", str(cfg.relative_to(ROOT)),
                            "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        verdict = {0: "fits", 3: "does not fit"}.get(r.returncode, f"error (exit {r.returncode})")
        rows.append({"config": str(cfg.relative_to(ROOT)), "device": device, "exit": r.returncode,
                     "verdict": verdict, "notes": [x for x in r.stdout.splitlines() if x.startswith("# note")],
                     "stderr_tail": r.stderr[-600:] if r.returncode not in (0, 3) else ""})
        if r.returncode not in (0, 3):
            bad.append(rows[-1]["config"])
    return {"status": "fail" if bad else "pass", "figures": {"configs": rows},
            "reason": f"--dry-run errored for {bad}" if bad else None}


# ------------------------------------------------------------------------------------------- main
CHECKS = ("environment", "nccl_stream", "learner_update", "bf16_speed", "dry_run")


def write_report(report: dict, env_f: dict, out: Path, seconds: float) -> list:
    """device_check.json and .txt as far as the checks have got; returns the failed checks."""
    report["seconds"] = round(seconds, 1)
    report["not_run"] = [c for c in CHECKS if c not in report["checks"]]
    report["skipped"] = {k: v.get("reason") for k, v in report["checks"].items() if v["status"] == "skipped"}
    failed = [k for k, v in report["checks"].items() if v["status"] == "fail"]
    report["verdict"] = ("fail" if failed else "incomplete" if report["not_run"] else
                         "pass" if not report["skipped"] else "pass with skips")
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"device_check {report['started']}: {report['verdict']} in {report['seconds']}s"]
    for k in ("torch", "cuda_available", "cuda_devices", "device_names", "nccl_version", "has_deepspeed",
              "has_vllm", "has_torch_npu"):
        if k in env_f:
            lines.append(f"  {k}: {env_f[k]}")
    for name, res in report["checks"].items():
        if name == "environment":
            continue
        lines.append(f"{name}: {res['status']}" + (f" — {res['reason']}" if res.get("reason") else ""))
        fig = res.get("figures") or {}
        if name == "dry_run":
            lines += [f"  {r['config']} ({r['device']}): {r['verdict']}" for r in fig.get("configs", [])]
        else:
            lines += [f"  {k}: {v}" for k, v in fig.items()]
    lines += [f"{name}: not run (time limit)" for name in report["not_run"]]
    (out / "device_check.txt").write_text("\n".join(lines) + "\n")
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "device_check_out")
    ap.add_argument("--stream-mb", type=float, default=256.0, help="size of the streamed state dict")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-check limit of the stream, seconds")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}
    t_all = time.perf_counter()
    env = check_environment()
    report["checks"]["environment"] = env
    env_f = env["figures"]
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        for name, fn in (("nccl_stream", lambda: check_stream(env_f, megabytes=args.stream_mb,
                                                              timeout_s=args.timeout)),
                         ("learner_update", lambda: check_learner_update(env_f, Path(tmp))),
                         ("bf16_speed", lambda: check_bf16_speed(env_f, Path(tmp))),
                         ("dry_run", check_dry_runs)):
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                res = {"status": "fail", "reason": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            res["seconds"] = round(time.perf_counter() - t0, 1)
            report["checks"][name] = res
            print(f"[device_check] {name}: {res['status']}" + (f" ({res['reason']})" if res.get("reason") else "")
                  + f" [{res['seconds']}s]", flush=True)
            # after every check: a run cut short by the time limit still leaves what it found
            failed = write_report(report, env_f, out, time.perf_counter() - t_all)
    print((out / "device_check.txt").read_text())
    print(f"[device_check] report: {out / 'device_check.json'} and {out / 'device_check.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
