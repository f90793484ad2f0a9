"""The experiment file and the runs it resolves to (``python -m passk_rl.experiment``'s plan; nothing runs here).

``load_experiment`` reads an experiment file strictly (an unknown or missing key is an error naming it);
``Planner`` resolves every run's config through the same loader a launch uses (errors before anything starts),
names its directory and knows the K each method trains for. ``passk_rl.experiment`` runs and reports the plan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from passk_rl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


class ExperimentError(ValueError):
    """A problem in the experiment file or a run it resolves to; the message names the key or method."""


# ================================================================================================ the file
@dataclasses.dataclass
class TuneSpec:
    seed: int = 0
    lrs: List[float] = dataclasses.field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    split: str = "val"
    num_prompts: int = 128
    n: int = 32
    eval_seed: int = 1


@dataclasses.dataclass
class EvalSpec:
    split: str = "test"
    num_prompts: int = 256
    n: int = 32
    ks: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    seed: int = 0
    temperature: float = 1.0


@dataclasses.dataclass
class FinalistSpec:
    baselines: int = 1
    candidates: int = 2


@dataclasses.dataclass
class MethodSpec:
    name: str
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""
    trains_for: Optional[int] = None  # the K whose validation pass@K picks the lr (default: from the config)
    lr: Any = "tune"  # "tune" | a number | another method's name
    seeds: Optional[List[int]] = None  # explicit seeds (otherwise: the tuning seed, or all seeds as a finalist)


@dataclasses.dataclass
class ExperimentSpec:
    name: str
    base_config: str
    methods: List[MethodSpec]
    k: int = 8
    runs_dir: str = ""
    out: str = ""
    common: Dict[str, Any] = dataclasses.field(default_factory=dict)
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    tune: TuneSpec = dataclasses.field(default_factory=TuneSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    baselines: List[str] = dataclasses.field(default_factory=list)
    candidates: List[str] = dataclasses.field(default_factory=list)
    finalists: FinalistSpec = dataclasses.field(default_factory=FinalistSpec)
    # Candidates whose validation pass@1 is within this of the best baseline's rank first (then by validation
    # pass@K): the recipe sought must win at pass@K *and* keep pass@1. None: rank by validation pass@K alone.
    pass1_slack: Optional[float] = None
    # Methods whose (pass@1, pass@big-K) trace the frontier of the report's pareto_frontier.png (e.g. rloo, the
    # multi_k mixing weights, pkpo); every other method is placed against it. Empty: no frontier figure.
    frontier: List[str] = dataclasses.field(default_factory=list)
    n_boot: int = 4000


def _strict(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown or missing keys are errors naming ``where``."""
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ExperimentError(f"{where}: unknown key {unknown[0]!r}; known keys: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ExperimentError(f"{where}: missing key {missing[0]!r}")
    return cls(**data)


def load_experiment(path: str | Path, sets: Sequence[str] = ()) -> ExperimentSpec:
    """Parse and check an experiment file (strictly); ``sets`` are ``dotted.key=value`` run overrides for all."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{p}: the top level must be a mapping")
    raw = dict(raw)
    where = str(p)
    raw["tune"] = _strict(TuneSpec, raw.get("tune", {}), f"{where}: tune")
    raw["eval"] = _strict(EvalSpec, raw.get("eval", {}), f"{where}: eval")
    raw["finalists"] = _strict(FinalistSpec, raw.get("finalists", {}), f"{where}: finalists")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ExperimentError(f"{where}: 'methods' must be a non-empty list")
    raw["methods"] = [_strict(MethodSpec, m, f"{where}: methods[{i}]") for i, m in enumerate(methods)]
    spec = _strict(ExperimentSpec, raw, where)
    for key, value in (item.split("=", 1) for item in sets):
        spec.common[key] = yaml.safe_load(value)
    _check_spec(spec, where)
    return spec


def _check_spec(spec: ExperimentSpec, where: str) -> None:
    names = [m.name for m in spec.methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExperimentError(f"{where}: method name {dup[0]!r} appears twice")
    for m in spec.methods:
        if not m.name or any(c in m.name for c in "/ "):
            raise ExperimentError(f"{where}: method name {m.name!r} must be a plain word (it names directories)")
        if isinstance(m.lr, str) and m.lr != "tune":
            if m.lr not in names or m.lr == m.name:
                raise ExperimentError(f"{where}: method {m.name!r}: lr {m.lr!r} is neither 'tune', a number, nor "
                                      f"another method's name (known: {names})")
            if next(o for o in spec.methods if o.name == m.lr).lr != "tune":
                raise ExperimentError(f"{where}: method {m.name!r} borrows the lr of {m.lr!r}, which does not tune "
                                      f"its own")
        elif not isinstance(m.lr, str) and not (isinstance(m.lr, (int, float)) and m.lr > 0):
            raise ExperimentError(f"{where}: method {m.name!r}: lr must be 'tune', a positive number or a method "
                                  f"name, got {m.lr!r}")
    for key in ("baselines", "candidates", "frontier"):
        bad = [n for n in getattr(spec, key) if n not in names]
        if bad:
            raise ExperimentError(f"{where}: {key}: unknown method {bad[0]!r} (known: {names})")
    if spec.frontier and len(spec.frontier) < 2:
        raise ExperimentError(f"{where}: frontier needs at least two methods, got {spec.frontier}")
    if not spec.tune.lrs or any(not (isinstance(x, (int, float)) and x > 0) for x in spec.tune.lrs):
        raise ExperimentError(f"{where}: tune.lrs must be a non-empty list of positive numbers")
    if not spec.seeds:
        raise ExperimentError(f"{where}: seeds must not be empty")
    if spec.k not in spec.eval.ks or 1 not in spec.eval.ks:
        raise ExperimentError(f"{where}: eval.ks must contain 1 and k={spec.k}")
    if max(spec.eval.ks) > spec.eval.n:
        raise ExperimentError(f"{where}: eval.ks {spec.eval.ks} exceed eval.n={spec.eval.n}")


# ================================================================================================ planning
def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


@dataclasses.dataclass
class Run:
    method: str
    lr: float
    seed: int
    name: str
    run_dir: Path
    cfg: Config
    overrides: List[str]

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "final_model"


def _override(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if yaml.safe_load(text) != value:
        text = json.dumps(value)
    return f"{key}={text}"


class Planner:
    """Resolves every run's config strictly (errors before anything starts) and names its directory."""

    def __init__(self, spec: ExperimentSpec, *, root: Path = ROOT):
        self.spec = spec
        self.root = root
        self.base = self._path(spec.base_config)
        self.runs_dir = self._path(spec.runs_dir or f"runs/experiments/{spec.name}")
        self.out = self._path(spec.out or f"docs/results/{spec.name}")
        self.methods = {m.name: m for m in spec.methods}
        self._cache: Dict[Tuple[str, float, int], Run] = {}

    def _path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.root / q

    def run(self, method: str, lr: float, seed: int) -> Run:
        key = (method, float(lr), int(seed))
        if key in self._cache:
            return self._cache[key]
        m = self.methods[method]
        name = f"{method}-lr{_lr_tag(lr)}-s{seed}"
        ov = ([_override(k, v) for k, v in self.spec.common.items()]
              + [_override(k, v) for k, v in m.overrides.items()]
              + [_override("learner.lr", float(lr)), _override("run.seed", int(seed)), _override("run.name", name),
                 _override("run.output_dir", str(self.runs_dir))])
        try:
            cfg = load_config(self.base, ov)
        except ConfigError as e:
            raise ExperimentError(f"method {method!r} (lr {lr:g}, seed {seed}): {e}") from None
        if cfg.eval.enabled:
            raise ExperimentError(f"method {method!r}: set eval.enabled: false in common (the experiment evaluates "
                                  f"every model itself, on the same prompts and sampling seeds)")
        run = Run(method, float(lr), int(seed), name, self.runs_dir / name, cfg, ov)
        self._cache[key] = run
        return run

    def trains_for(self, method: str) -> int:
        """The K whose validation pass@K picks this method's lr: ``trains_for``, else the fixed K of a shaping that
        uses K (the largest weight's K for multi-K schedules), else 1."""
        from passk_rl import shaping

        m = self.methods[method]
        if m.trains_for is not None:
            return int(m.trains_for)
        cfg = self.run(method, self.spec.tune.lrs[0], self.spec.tune.seed).cfg
        if not shaping.info(cfg.algorithm.shaping).uses_k:
            return 1
        if cfg.schedule.kind == "fixed":
            return int(cfg.schedule.params.get("k", 1))
        raise ExperimentError(f"method {method!r}: set trains_for (schedule {cfg.schedule.kind!r} has no single K)")

    def grid(self, method: str, chosen: Dict[str, float]) -> List[float]:
        m = self.methods[method]
        if m.lr == "tune":
            return [float(x) for x in self.spec.tune.lrs]
        if isinstance(m.lr, str):
            return [chosen[m.lr]]
        return [float(m.lr)]

    def check_all(self) -> List[Run]:
        """Resolve every run the experiment can ask for; the same model, task and generation everywhere."""
        runs = []
        for m in self.spec.methods:
            lrs = self.spec.tune.lrs if m.lr == "tune" or isinstance(m.lr, str) else [m.lr]
            for lr in lrs:
                for seed in sorted({self.spec.tune.seed, *self.spec.seeds, *(m.seeds or [])}):
                    runs.append(self.run(m.name, lr, seed))
            self.trains_for(m.name)
        first = runs[0].cfg
        for r in runs[1:]:
            for what, a, b in (("model.path", first.model.path, r.cfg.model.path),
                               ("task.name", first.task.name, r.cfg.task.name),
                               ("task.params", first.task.params, r.cfg.task.params),
                               ("generator.max_tokens", first.generator.max_tokens, r.cfg.generator.max_tokens)):
                if a != b:
                    raise ExperimentError(f"runs {runs[0].name} and {r.name} differ in {what} ({a!r} vs {b!r}): "
                                          f"every model is evaluated against the same base and prompts")
        return runs
