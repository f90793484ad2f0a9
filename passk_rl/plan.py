"""Placement plan and per-device memory arithmetic (``launch --dry-run``), without starting anything.

The plan splits ``cluster.num_devices`` between generator engines (each ``tensor_parallel_size`` devices) and
learner ranks (one device each) and estimates, per device:

- learner (Adam, ZeRO-k over W ranks; P parameters; b = 2 bytes in bf16/fp16, 4 in float32 = ``model.dtype``):
  weights bP — sharded only at ZeRO-3; gradients bP — sharded at ZeRO ≥ 2; optimizer states 12P in mixed
  precision (fp32 master 4P + Adam m 4P + v 4P), 8P in fp32 (m + v) — sharded at ZeRO ≥ 1; a frozen reference model 2P (sharded at ZeRO-3)
  when the KL term is on; activations ≈ micro_batch · seq · hidden · layers · c bytes, with c = 34 without and
  c = 2 with gradient checkpointing (Korthikanti et al. 2022's per-layer estimate, no sequence parallelism),
  plus the logits micro_batch · seq · vocab · 4 bytes (fp32 log-softmax).
- generator engine (per device of a TP group): weights bP/TP; KV cache the rest of
  ``gpu_memory_utilization`` · memory; KV bytes per token = 2 · layers · kv_heads · head_dim · b / TP.
  The plan checks that the engine's share of one step's sequences fits its KV cache at least once.

A plan whose learner device or generator weights do not fit the per-device memory is rejected with the numbers.
On ``cpu`` the plan reports host-RAM figures for the same formulas and does not reject.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional

from cluster.devices import device_spec
from passk_rl.config import Config, ConfigError, ModelSpec

GIB = 1024**3

# Architecture numbers of models we ship configs for, so planning works offline (no hub access).
KNOWN_MODELS: Dict[str, ModelSpec] = {
    "Qwen/Qwen2.5-7B-Instruct": ModelSpec(7.62, 28, 3584, 4, 128, 152064),
    "Qwen/Qwen2.5-7B": ModelSpec(7.62, 28, 3584, 4, 128, 152064),
    "Qwen/Qwen3-4B": ModelSpec(4.02, 36, 2560, 8, 128, 151936),
    "Qwen/Qwen3-4B-Base": ModelSpec(4.02, 36, 2560, 8, 128, 151936),
}


@dataclasses.dataclass
class DevicePlan:
    role: str
    count: int
    items_gib: Dict[str, float]

    @property
    def total_gib(self) -> float:
        return sum(self.items_gib.values())


@dataclasses.dataclass
class Plan:
    device: str
    num_devices: int
    memory_gib: float
    generator_devices: int
    learner_devices: int
    per_device: List[DevicePlan]
    notes: List[str]
    fits: bool

    def render(self) -> str:
        lines = [
            f"device: {self.device}  devices used: {self.generator_devices + self.learner_devices}"
            f"/{self.num_devices or '-'}  (generators {self.generator_devices}, learner {self.learner_devices})",
            f"per-device budget: {self.memory_gib:.1f} GiB" if self.memory_gib else "per-device budget: host RAM",
        ]
        for dp in self.per_device:
            lines.append(f"  {dp.role} × {dp.count}: total {dp.total_gib:.2f} GiB")
            for k, v in dp.items_gib.items():
                lines.append(f"      {k:<28} {v:8.2f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("plan: FITS" if self.fits else "plan: DOES NOT FIT")
        return "\n".join(lines)


def model_spec(cfg: Config) -> ModelSpec:
    """Architecture numbers from ``model.spec``, the known-model table, or a local HF config.json."""
    if cfg.model.spec is not None and cfg.model.spec.params_b > 0:
        return cfg.model.spec
    if cfg.model.path in KNOWN_MODELS:
        return KNOWN_MODELS[cfg.model.path]
    path = cfg.model.path
    if path.startswith("builtin:"):
        from passk_rl.models.resolve import resolve_model
        from passk_rl.tasks.make_base import make_recipe

        path = resolve_model(path, key="model.path", check=False).path  # where it is; weights not read
        if not (Path(path) / "config.json").is_file():  # not built yet: the recipe's numbers (vocab ≤ 64)
            r = make_recipe()
            head_dim = r.hidden_size // r.num_heads
            params = r.num_layers * 12 * r.hidden_size ** 2 + 2 * 64 * r.hidden_size
            return ModelSpec(params / 1e9, r.num_layers, r.hidden_size, r.num_heads, head_dim, 64)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        hf = json.loads(cfg_file.read_text())
        hidden = hf["hidden_size"]
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        inter = hf.get("intermediate_size", 4 * hidden)
        vocab = hf["vocab_size"]
        kv = hf.get("num_key_value_heads", heads)
        head_dim = hf.get("head_dim") or hidden // heads
        per_layer = hidden * head_dim * (heads + 2 * kv) + heads * head_dim * hidden + 3 * hidden * inter
        emb = vocab * hidden * (1 if hf.get("tie_word_embeddings") else 2)
        return ModelSpec((layers * per_layer + emb) / 1e9, layers, hidden, kv, head_dim, vocab)
    raise ConfigError(
        f"model.spec: cannot plan memory for model.path={cfg.model.path!r}: it is not a local directory with "
        f"config.json and not a known model ({sorted(KNOWN_MODELS)}); give model.spec "
        f"(params_b, num_layers, hidden_size, num_kv_heads, head_dim, vocab_size)"
    )


_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def make_plan(cfg: Config, spec: Optional[ModelSpec] = None) -> Plan:
    dev = device_spec(cfg.cluster.device)
    spec = spec or model_spec(cfg)
    P = spec.params_b * 1e9
    W = cfg.learner.world_size
    Z = cfg.learner.zero_stage
    tp = cfg.generator.tensor_parallel_size
    gen_devices = cfg.generator.num_engines * tp
    accel = cfg.cluster.device != "cpu"
    mem = cfg.cluster.device_memory_gib or dev.memory_gib
    notes: List[str] = []
    fits = True

    seq = cfg.model.max_model_len
    mbs = cfg.learner.micro_batch_size
    act_c = 2 if cfg.learner.gradient_checkpointing else 34
    # fp32 training keeps no separate master copy: Adam's m and v are the optimizer state (8P); bf16/fp16 add it (12P)
    dt, b = ("fp32", 4) if cfg.model.dtype == "float32" else (_SHORT.get(cfg.model.dtype, cfg.model.dtype), 2)
    learner_items = {
        f"weights ({dt})": b * P / (W if Z >= 3 else 1) / GIB,
        f"gradients ({dt})": b * P / (W if Z >= 2 else 1) / GIB,
        ("optimizer (Adam m+v)" if b == 4 else "optimizer (fp32 master+Adam)"): (8 if b == 4 else 12) * P / W / GIB,
        "activations": mbs * seq * spec.hidden_size * spec.num_layers * act_c / GIB,
        "logits (fp32)": mbs * seq * spec.vocab_size * 4 / GIB,
    }
    if cfg.learner.kl_coef > 0:
        learner_items[f"reference model ({dt})"] = b * P / (W if Z >= 3 else 1) / GIB
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * b / tp
    gen_weights = b * P / tp / GIB
    if accel:
        kv_budget = max(0.0, cfg.generator.gpu_memory_utilization * mem - gen_weights)
    else:
        kv_budget = cfg.generator.kv_cache_gib
    step_tokens = cfg.data.prompts_per_step * cfg.generator.n * seq / cfg.generator.num_engines
    gen_items = {f"weights ({dt})": gen_weights, "KV cache": kv_budget}
    per = [DevicePlan("learner rank", W, learner_items), DevicePlan(f"generator (TP={tp})", gen_devices, gen_items)]

    kv_tokens = kv_budget * GIB / kv_per_token if kv_per_token else 0
    notes.append(
        f"KV cache holds {kv_tokens:,.0f} tokens per engine; one step needs up to {step_tokens:,.0f} "
        f"(prompts_per_step·n·max_model_len / engines)"
    )
    if kv_tokens < seq:
        fits = False
        notes.append(f"KV cache cannot hold one sequence of max_model_len={seq}")
    elif kv_tokens < step_tokens:
        notes.append("engines will run the step's sequences in several waves (fine, but slower)")

    if accel:
        if cfg.cluster.num_devices <= 0:
            raise ConfigError(f"cluster.num_devices: must be > 0 on cluster.device={cfg.cluster.device}")
        used = gen_devices + W
        if used > cfg.cluster.num_devices:
            fits = False
            notes.append(f"needs {used} devices (generators {gen_devices} + learner {W}) but cluster.num_devices="
                         f"{cfg.cluster.num_devices}")
        for dp in per:
            budget = mem if dp.role.startswith("learner") else cfg.generator.gpu_memory_utilization * mem
            if dp.total_gib > budget + 1e-9:
                fits = False
                notes.append(f"{dp.role}: {dp.total_gib:.1f} GiB exceeds the per-device budget {budget:.1f} GiB")
        if gen_weights >= cfg.generator.gpu_memory_utilization * mem:
            fits = False
    # Weight sync: what moves every step. The file transport writes the fp32 model once and every engine reads all
    # of it; the collective one broadcasts the training dtype once (each engine keeps its TP shard).
    dtype_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    file_gb = 4 * P * (1 + cfg.generator.num_engines) / 1e9
    coll_gb = dtype_bytes * P / 1e9
    notes.append(f"weight sync per step: file transport {file_gb:,.1f} GB through {cfg.sync.root} (fp32 written "
                 f"once, read by {cfg.generator.num_engines} engine(s)); collective {coll_gb:,.1f} GB broadcast in "
                 f"{cfg.model.dtype}, no file ({file_gb / max(coll_gb, 1e-12):.0f}× less data)")
    return Plan(cfg.cluster.device, cfg.cluster.num_devices, mem if accel else 0.0, gen_devices, W, per, notes, fits)


def overlap_projection(phase_seconds: Dict[str, float]) -> str:
    """What one-step off-policy (algorithm.max_staleness=1) would gain from measured phase times of a
    synchronous run: sampling and verifying overlap the update, so the step is max(generate + verify, update)
    plus the rest instead of their sum (an upper bound: on shared hardware the overlapped phases compete)."""
    g = phase_seconds.get("generate", 0.0) + phase_seconds.get("verify", 0.0)
    u = phase_seconds.get("update", 0.0)
    rest = sum(v for k, v in phase_seconds.items() if k not in ("generate", "verify", "update"))
    sync_step, async_step = g + u + rest, max(g, u) + rest
    return (f"measured synchronous step {sync_step:.2f} s (generate+verify {g:.2f}, update {u:.2f}, other {rest:.2f}); "
            f"with max_staleness=1 at most {sync_step / max(async_step, 1e-12):.2f}× faster ({async_step:.2f} s) "
            f"when sampling and training run on separate devices")
