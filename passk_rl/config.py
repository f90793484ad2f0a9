"""One typed config tree (dataclasses) mirrored by YAML, loaded strictly.

``load_config(path, overrides)`` reads YAML, applies ``dotted.key=value`` overrides and builds the tree. An
unknown key, a value of the wrong type, or a value outside its allowed set is a ``ConfigError`` that names the
dotted key (and the allowed values), raised before any actor starts. ``validate(cfg)`` adds the cross-field
checks (K ≤ n, batch divisibility, names that must exist in a registry).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


def _choice(*allowed: str) -> Dict[str, Any]:
    return {"choices": allowed}


# ----------------------------------------------------------------------------------------------- the tree
@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    steps: int = 10
    checkpoint_interval: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 1
    resume: bool = False  # continue from the newest checkpoint in runs/<name>/checkpoints (if any)


@dataclasses.dataclass
class ClusterConfig:
    device: str = dataclasses.field(default="cpu", metadata=_choice("cpu", "cuda", "npu"))
    # Ray address to join; "auto" joins the cluster of the Ray job (or a running local one); "local" starts a
    # private one. Inside `ray job submit` the job's cluster is always used.
    address: str = "local"
    num_cpus: Optional[float] = None  # CPUs for a cluster this process starts
    num_devices: int = 0  # accelerators the plan may use (cuda/npu)
    device_memory_gib: Optional[float] = None  # per-device budget for the planner; default from the device table
    placement_strategy: str = dataclasses.field(default="PACK", metadata=_choice("PACK", "SPREAD", "STRICT_PACK"))


@dataclasses.dataclass
class ModelSpec:
    """Architecture numbers for planning a model that is not on local disk (hub ids on an offline machine)."""

    params_b: float = 0.0
    num_layers: int = 0
    hidden_size: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0


@dataclasses.dataclass
class ModelConfig:
    # "builtin:arith-base" builds/reuses the tiny base model of the built-in task; else a local HF directory
    # or a hub id (hub ids need network or a local cache).
    path: str = "builtin:arith-base"
    dtype: str = dataclasses.field(default="float32", metadata=_choice("float32", "bfloat16", "float16"))
    max_model_len: int = 256
    spec: Optional[ModelSpec] = None


@dataclasses.dataclass
class TaskConfig:
    name: str = "arith"
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "test"


@dataclasses.dataclass
class DataConfig:
    prompts_per_step: int = 16
    shuffle: bool = True
    max_prompts: int = 0  # train on the first N prompts of the split only (0: all of them)


@dataclasses.dataclass
class GeneratorConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    n: int = 16  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    kv_cache_gib: float = 0.25  # CPU: KV cache size; cuda/npu use gpu_memory_utilization
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    num_cpus_per_engine: float = 0.5
    max_num_seqs: int = 256


@dataclasses.dataclass
class VerifierConfig:
    num_workers: int = 1
    timeout_s: float = 10.0
    num_cpus_per_worker: float = 0.25


@dataclasses.dataclass
class LearnerConfig:
    world_size: int = 2
    zero_stage: int = dataclasses.field(default=2, metadata=_choice(2, 3))
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = dataclasses.field(
        default="seq_mean_token_sum",
        metadata=_choice("seq_mean_token_sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    )
    kl_coef: float = 0.0
    kl_estimator: str = dataclasses.field(default="k3", metadata=_choice("k1", "k2", "k3"))
    gradient_checkpointing: bool = False
    num_cpus_per_rank: float = 0.5


@dataclasses.dataclass
class AlgorithmConfig:
    shaping: str = "pkpo_loo_minus_one"
    shaping_params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where plug-in shapings take p̂ from: "group" (the current group, as the papers define GRPO & co.; biased at
    # finite n) or "estimator" (the central p̂ actor's per-prompt value, which does not depend on the current
    # group; clipped to [1/n, 1 - 1/n] so a rarely solved prompt cannot blow an advantage up).
    p_hat_source: str = dataclasses.field(default="group", metadata=_choice("group", "estimator"))


@dataclasses.dataclass
class GuardConfig:
    """When a step's numbers say the run has gone wrong: stop with a message naming what, never train on."""

    # An advantage beyond this × the largest the shaping's group form gives at n (shaping.advantage_bound)
    # stops the run, naming the prompts (only reachable with p_hat_source=estimator or custom shaping params).
    max_advantage_ratio: float = 2.0
    # A learner gradient norm (before clipping) above this stops the run, naming the prompts with the largest
    # |advantage|. Healthy runs of the default config stay around 1-10 (the GRPO blow-up of issue 11 reached 2.6e5).
    max_grad_norm: float = 1.0e3
    # A non-finite loss or gradient makes DeepSpeed skip the optimizer step; this many such steps in a row stop
    # the run.
    max_skipped_steps: int = 3


@dataclasses.dataclass
class EstimatorConfig:
    kind: str = "ema"
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ScheduleConfig:
    kind: str = "fixed"
    params: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"k": 4})


@dataclasses.dataclass
class SyncConfig:
    transport: str = dataclasses.field(default="shm_safetensors", metadata=_choice("shm_safetensors", "collective"))
    root: str = "/dev/shm/passk_rl"
    probe: bool = True  # after each sync, check generator logprobs against the learner on a fixed completion


@dataclasses.dataclass
class EvalConfig:
    interval: int = 0  # evaluate held-out pass@k every this many steps (0: only before and after training)
    n: int = 64
    ks: List[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    num_prompts: int = 64
    temperature: float = 1.0
    enabled: bool = True


@dataclasses.dataclass
class LoggingConfig:
    ray_metrics: bool = True
    console_every: int = 1
    pass_at_ks: List[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generator: GeneratorConfig = dataclasses.field(default_factory=GeneratorConfig)
    verifier: VerifierConfig = dataclasses.field(default_factory=VerifierConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    estimator: EstimatorConfig = dataclasses.field(default_factory=EstimatorConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    sync: SyncConfig = dataclasses.field(default_factory=SyncConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


# ------------------------------------------------------------------------------------------- strict build
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (types.UnionType is not None and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key)
        raise ConfigError(f"{key}: unsupported union type {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string; accept numeric strings for floats only.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: Any, data: Dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r} in {where}; "
            f"known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices is not None and converted not in choices:
            raise ConfigError(f"{key}: {converted!r} is not allowed; allowed values: {list(choices)}")
        kwargs[name] = converted
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> List[Tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else "")) 
    return out


def config_from_dict(data: Dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    data = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    try:
        return config_from_dict(data or {}, overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------- cross checks
def _positive(cfg: Config) -> None:
    checks = {
        "run.steps": cfg.run.steps >= 0,
        "data.prompts_per_step": cfg.data.prompts_per_step >= 1,
        "data.max_prompts": cfg.data.max_prompts >= 0,
        "generator.num_engines": cfg.generator.num_engines >= 1,
        "generator.tensor_parallel_size": cfg.generator.tensor_parallel_size >= 1,
        "generator.n": cfg.generator.n >= 1,
        "generator.max_tokens": cfg.generator.max_tokens >= 1,
        "generator.temperature": cfg.generator.temperature > 0,
        "generator.top_p": 0 < cfg.generator.top_p <= 1,
        "generator.kv_cache_gib": cfg.generator.kv_cache_gib > 0,
        "generator.gpu_memory_utilization": 0 < cfg.generator.gpu_memory_utilization <= 1,
        "verifier.num_workers": cfg.verifier.num_workers >= 1,
        "verifier.timeout_s": cfg.verifier.timeout_s > 0,
        "learner.world_size": cfg.learner.world_size >= 1,
        "learner.lr": cfg.learner.lr > 0,
        "learner.micro_batch_size": cfg.learner.micro_batch_size >= 1,
        "learner.kl_coef": cfg.learner.kl_coef >= 0,
        "learner.clip_low": cfg.learner.clip_low >= 0,
        "learner.clip_high": cfg.learner.clip_high >= 0,
        "model.max_model_len": cfg.model.max_model_len >= 8,
        "eval.n": cfg.eval.n >= 1,
        "eval.num_prompts": cfg.eval.num_prompts >= 1,
        "run.checkpoint_interval": cfg.run.checkpoint_interval >= 0,
        "run.keep_checkpoints": cfg.run.keep_checkpoints >= 1,
        "guard.max_advantage_ratio": cfg.guard.max_advantage_ratio >= 1,
        "guard.max_grad_norm": cfg.guard.max_grad_norm > 0,
        "guard.max_skipped_steps": cfg.guard.max_skipped_steps >= 1,
    }
    for key, ok in checks.items():
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: invalid value {getattr(getattr(cfg, section), name)!r}")
    if len(cfg.learner.betas) != 2 or not all(0 <= b < 1 for b in cfg.learner.betas):
        raise ConfigError(f"learner.betas: expected two numbers in [0, 1), got {cfg.learner.betas}")


def validate(cfg: Config) -> None:
    """Cross-field checks and registry names; raises ConfigError naming the key."""
    from passk_rl import schedule, shaping, stats
    from passk_rl.tasks import TASKS

    _positive(cfg)
    if cfg.algorithm.shaping not in shaping.SHAPINGS:
        raise ConfigError(
            f"algorithm.shaping: unknown shaping {cfg.algorithm.shaping!r}; allowed values: {list(shaping.SHAPINGS)}"
        )
    if cfg.estimator.kind not in stats.STATS:
        raise ConfigError(f"estimator.kind: unknown p̂ estimator {cfg.estimator.kind!r}; allowed values: {sorted(stats.STATS)}")
    if cfg.schedule.kind not in schedule.SCHEDULES:
        raise ConfigError(f"schedule.kind: unknown K schedule {cfg.schedule.kind!r}; allowed values: {sorted(schedule.SCHEDULES)}")
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {cfg.task.name!r}; allowed values: {sorted(TASKS)}")
    # Build the estimator and schedule once so bad params fail here, with the key named.
    try:
        stats.make_stats(cfg.estimator.kind, **cfg.estimator.params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"estimator.params: {e}") from None
    try:
        sched = schedule.make_schedule(cfg.schedule.kind, **cfg.schedule.params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"schedule.params: {e}") from None
    k_max = getattr(sched, "max_k", None)
    if k_max is not None and k_max > cfg.generator.n:
        raise ConfigError(
            f"schedule.params: the schedule can ask for K={k_max} but generator.n={cfg.generator.n}; "
            f"K must not exceed the samples per prompt"
        )
    if cfg.schedule.kind == "fixed" and not shaping.info(cfg.algorithm.shaping).uses_k_weights:
        # A fixed K the shaping cannot take would be clamped every step: say so now instead.
        try:
            shaping.info(cfg.algorithm.shaping).check_k(cfg.generator.n, sched.next(0.0, step=0, n=cfg.generator.n).k)
        except ValueError as e:
            raise ConfigError(f"schedule.params: {e} (generator.n={cfg.generator.n})") from None
    for k in cfg.eval.ks:
        if k < 1 or k > cfg.eval.n:
            raise ConfigError(f"eval.ks: k={k} must be in [1, eval.n={cfg.eval.n}]")
    for k in cfg.logging.pass_at_ks:
        if k < 1:
            raise ConfigError(f"logging.pass_at_ks: k={k} must be >= 1")
    if cfg.algorithm.shaping == "passk_analytic" and cfg.algorithm.p_hat_source == "estimator":
        raise ConfigError(
            "algorithm.p_hat_source: 'estimator' cannot be used with algorithm.shaping='passk_analytic': Chen et "
            "al. divide by the spread of the group's own pass@K statistic, and an outside p̂ that disagrees with "
            "the group makes that spread tiny (advantages up to ~100× the group form's at n=16, K=8); use 'group'"
        )
    if cfg.cluster.device == "cpu":
        if cfg.generator.tensor_parallel_size != 1:
            raise ConfigError("generator.tensor_parallel_size: must be 1 on cluster.device=cpu")
        if cfg.sync.transport != "shm_safetensors":
            raise ConfigError("sync.transport: only 'shm_safetensors' works on cluster.device=cpu")
        if cfg.model.dtype == "float16":
            raise ConfigError("model.dtype: float16 is not supported on cluster.device=cpu; use float32 or bfloat16")
