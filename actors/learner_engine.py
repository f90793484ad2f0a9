"""One learner rank: an HF causal LM in a DeepSpeed ZeRO-2/3 engine, trained on columnar batches.

Exactness contract (tested against a single-process torch reference): the parameter update of one
``train_step`` equals one optimizer step on the *full-batch* loss, whatever the world size W and micro-batch
size. How:

* Every aggregation in :mod:`passk_rl.losses` is a sum over sequences once its denominators are fixed. At the
  start of a step the ranks all-reduce the global sample count B, token count N, longest response T_max and
  the number of micro-batches; each micro-batch loss is computed with those global denominators, so the
  micro-batch losses of all ranks add up to the full-batch loss (``token_mean`` needs the global N — a
  per-micro-batch or per-rank mean would weight tokens of short micro-batches more).
* DeepSpeed *averages* gradients over the W data-parallel ranks, so each rank backpropagates W × its partial
  loss (and ``scale_wrt_gas=False``: we do our own accumulation scaling). Sum over ranks / W = full gradient.
* ZeRO-2/3 reduce gradients inside every backward (collectives), so all ranks must run the same number of
  forward/backward passes: a rank with fewer samples runs padding micro-batches whose mask is all zero (they
  contribute exactly zero gradient but take part in the collectives).
* ``gradient_clipping`` (DeepSpeed) clips by the global norm of the full gradient, as the reference does.

A rank's shard is a :class:`passk_rl.batch.Batch`. Behaviour logprobs must be in the same convention as the
learner's ``temperature``: vLLM's default ``raw_logprobs`` ignore sampling temperature, so pair them with
``temperature=1.0``. The loss is :func:`passk_rl.losses.learner_loss`; weights leave through
:class:`actors.learner_export.WeightExporter`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from actors.learner_export import WeightExporter
from cluster.devices import device_spec, set_process_env
from passk_rl.batch import Batch, collate
from passk_rl.config import BOUNDS, check_field
from passk_rl.losses import LossOptions, importance_weights, learner_loss, token_logprobs, \
    token_logprobs_and_entropy

OPTIMIZERS = ("adamw", "sgd")


def skip_deepspeed_inference_comm_op() -> Optional[str]:
    """Keep ``deepspeed.init_distributed`` from JIT-building DeepSpeed's shared-memory all-reduce op; returns the
    op's name where the accelerator has one (the CPU accelerator), else None.

    DeepSpeed 0.19 builds ``deepspeed_shm_comm`` with torch's extension builder at every ``init_distributed`` on
    the CPU accelerator, but only ``inference_all_reduce`` uses it (the tensor-parallel inference layers of
    ``deepspeed.module_inject``); ZeRO training reduces through ``torch.distributed`` (gloo here). So the learner
    paid a C++ compile of about a minute on every fresh machine (each user's first run, every CI run) for an op
    it never calls, and the build's ``lock`` file, left by a rank killed mid-build, made every later start on the
    machine wait forever (the suite hang of 2026-12-04). ``build_shm_op`` returns None for an op that
    ``deepspeed.ops.__compatible_ops__`` marks incompatible, so that is where the learner says no."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return builder.NAME


@dataclasses.dataclass(frozen=True)
class LearnerOptions:
    """What one learner rank is (engine, optimizer, update schedule) plus how it scores (``loss``).

    ``from_flat`` takes the flat ``learner.*`` names (as the config and ``LearnerGroup(**kwargs)`` spell them);
    an unknown name is a TypeError naming it."""

    zero_stage: int = 2
    micro_batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    bf16: bool = False
    seed: int = 0
    ref_model: bool = False  # load a frozen copy of the initial model (needed by kl_coef > 0)
    gradient_checkpointing: bool = False
    ds_config_overrides: Optional[Mapping[str, Any]] = None
    loss: LossOptions = LossOptions()

    def __post_init__(self):
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; allowed: {list(OPTIMIZERS)}")
        # Numeric bounds live in one table, config.BOUNDS (the config loader checks the same): a learner built
        # without a config gets the same error naming the same key.
        flat = {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loss"},
                **{f.name: getattr(self.loss, f.name) for f in dataclasses.fields(self.loss)}}
        for name, value in flat.items():
            if f"learner.{name}" in BOUNDS:
                check_field(f"learner.{name}", value)
        if self.loss.kl_coef > 0 and not self.ref_model:
            raise ValueError("kl_coef > 0 needs a frozen reference model: set ref_model=True")

    @classmethod
    def from_flat(cls, **kw) -> "LearnerOptions":
        loss_names = {f.name for f in dataclasses.fields(LossOptions)}
        own = {f.name for f in dataclasses.fields(cls)} - {"loss"}
        unknown = set(kw) - loss_names - own
        if unknown:
            raise TypeError(f"unknown learner option(s) {sorted(unknown)}")
        loss = LossOptions(**{k: v for k, v in kw.items() if k in loss_names})
        rest = {k: v for k, v in kw.items() if k in own}
        if "betas" in rest:
            rest["betas"] = tuple(rest["betas"])
        return cls(loss=loss, **rest)

    @classmethod
    def flat_names(cls) -> set:
        return ({f.name for f in dataclasses.fields(cls)} - {"loss"}) | {f.name for f in dataclasses.fields(LossOptions)}


def _deep_update(base: dict, override: Mapping) -> dict:
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _safetensors_files(model_path: str) -> List[Path]:
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        import json
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no safetensors weights in {model_path!r} (expected model.safetensors or "
                            f"model.safetensors.index.json; ZeRO-3 loading reads safetensors only)")


def as_batch(batch: Union[Batch, Sequence[Mapping[str, Any]]], *, where: str,
             default_advantage: Optional[float] = None) -> Batch:
    return Batch.from_samples(batch, where=where, default_advantage=default_advantage)


class LearnerWorker:
    """One learner rank. All ranks of a group call the collective methods (``train_step``, ``compute_logprobs``,
    ``gather_state_dict``, ``publish_weights``, ``save_checkpoint``, ``load_checkpoint``, ``export_hf``) together,
    each with its own shard.

    Gradient accumulation is derived per step: ceil(max-over-ranks local samples / ``micro_batch_size``)
    micro-batches, one optimizer step per update.
    """

    def __init__(self, model_path: str, options: LearnerOptions = LearnerOptions(), *, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500, local_rank: int = 0,
                 device: str = "cpu"):
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path {model_path!r} has no config.json (expected an HF model directory)")
        self.opts, self.loss_opts = options, options.loss
        self.model_path = str(model_path)
        self.rank, self.world_size = rank, world_size
        self.zero_stage, self.micro_batch_size = options.zero_stage, options.micro_batch_size
        self.seed = int(options.seed)

        # Environment first: DeepSpeed picks its accelerator at import time from DS_ACCELERATOR.
        self.spec = device_spec(device)
        self.spec.import_extension()
        set_process_env(self.spec)
        os.environ.update({"MASTER_ADDR": str(master_addr), "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)})
        t0 = time.perf_counter()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self._ds = deepspeed
        skip_deepspeed_inference_comm_op()
        t1 = time.perf_counter()
        deepspeed.init_distributed(dist_backend=self.spec.dist_backend)
        t2 = time.perf_counter()
        acc = get_accelerator()
        if self.spec.kind != "cpu":
            acc.set_device(local_rank)
        self.device = torch.device(acc.current_device_name()) if self.spec.kind != "cpu" else torch.device("cpu")
        torch.manual_seed(self.seed)

        from transformers import AutoTokenizer

        self.ds_config = self._build_ds_config()
        dtype = torch.bfloat16 if options.bf16 else torch.float32
        model = self._load_model(dtype)
        t3 = time.perf_counter()
        model.config.use_cache = False
        if options.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception:  # a weights-only directory is still trainable; export_hf then skips the tokenizer
            self.tokenizer = None
        self.pad_id = self._pad_id(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self._optimizer(model),
                                                                 config=self.ds_config)
        t4 = time.perf_counter()
        self.ref = self._load_ref(dtype) if options.ref_model else None
        self.exporter = WeightExporter(self.engine, rank=rank, zero_stage=self.zero_stage, device=self.device,
                                       model_path=self.model_path, tokenizer=self.tokenizer, barrier=self._barrier)
        # where start-up time goes (import / rendezvous / load / engine build / reference), for the launch log
        self.init_seconds = {"import": t1 - t0, "init_distributed": t2 - t1, "load_model": t3 - t2,
                             "deepspeed_initialize": t4 - t3, "ref_model": time.perf_counter() - t4}

    # ------------------------------------------------------------------ setup helpers
    def _optimizer(self, model) -> torch.optim.Optimizer:
        o = self.opts
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # AdamW convention: no weight decay on 1-D tensors (norm weights, biases).
        decay = [p for n, p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for n, p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if o.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        return torch.optim.SGD(groups, lr=o.lr)  # plain SGD: exact, scale-sensitive updates (Δθ = −lr·g)

    def _load_ref(self, dtype: torch.dtype):
        ref = self._load_model(dtype)
        ref.config.use_cache = False
        ref.requires_grad_(False)
        ref.eval()
        if self.zero_stage != 3:
            return ref.to(self.device)
        ref_cfg = {k: v for k, v in self.ds_config.items() if k not in ("gradient_clipping",)}
        ref_cfg["zero_optimization"] = {k: v for k, v in self.ds_config["zero_optimization"].items()
                                        if k.startswith("stage")}
        engine, *_ = self._ds.initialize(model=ref, config=ref_cfg)
        engine.eval()
        return engine

    def _build_ds_config(self) -> dict:
        zero = {"stage": self.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)}
        if self.zero_stage == 3:
            zero.update({"stage3_prefetch_bucket_size": int(5e7), "stage3_max_live_parameters": int(1e9),
                         "stage3_gather_16bit_weights_on_model_save": False})
        cfg = {
            # Accumulation is driven by hand (variable micro-batch counts per step); these only satisfy
            # DeepSpeed's batch-size arithmetic.
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.micro_batch_size * self.world_size,
            "gradient_clipping": float(self.opts.grad_clip),
            "zero_optimization": zero,
            "bf16": {"enabled": bool(self.opts.bf16)},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if self.opts.bf16:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        if self.opts.ds_config_overrides:
            _deep_update(cfg, self.opts.ds_config_overrides)
        return cfg

    def _load_model(self, dtype: torch.dtype):
        """Load the HF causal LM; under ZeRO-3 straight into partitioned parameters.

        ZeRO-3: the model is built under ``deepspeed.zero.Init`` (each rank holds only its partition) and the
        safetensors weights are copied in one parameter at a time (gathered, written by rank 0, re-partitioned),
        so no rank ever materialises the whole model. (transformers' own route, HfDeepSpeedConfig, would need
        the ``accelerate`` package.)
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.zero_stage != 3:
            return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        from safetensors import safe_open

        cfg = AutoConfig.from_pretrained(self.model_path)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        # no_init_weights: random init would index into the empty local partitions (and is overwritten anyway).
        # No dtype= here: DeepSpeed 0.19 maps an explicit float32 to bf16 on accelerators without fp16 (CPU);
        # without it the dtype follows the config's bf16 flag.
        with no_init_weights(), self._ds.zero.Init(config_dict_or_path=self.ds_config):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        where = {}
        for f in _safetensors_files(self.model_path):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    where[k] = f
        tensors = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if n in set(model.state_dict().keys())]
        missing = [n for n, _ in tensors if n not in where]
        if missing:
            raise ValueError(f"checkpoint {self.model_path!r} lacks weights for {missing[:8]}"
                             f"{' …' if len(missing) > 8 else ''} ({len(missing)} missing)")
        for name, t in tensors:
            is_param = isinstance(t, torch.nn.Parameter)
            ctx = self._ds.zero.GatheredParameters([t], modifier_rank=0) if is_param else contextlib.nullcontext()
            with ctx:
                if self.rank == 0 or not is_param:
                    with safe_open(str(where[name]), framework="pt") as fh:
                        w = fh.get_tensor(name)
                    if tuple(w.shape) != tuple(t.shape):
                        raise ValueError(f"checkpoint weight {name!r} has shape {tuple(w.shape)}, model expects "
                                         f"{tuple(t.shape)}")
                    with torch.no_grad():
                        t.data.copy_(w.to(t.dtype))
        return model

    def _pad_id(self, model) -> int:
        for src in (self.tokenizer, model.config):
            pid = getattr(src, "pad_token_id", None) if src is not None else None
            if pid is not None:
                return int(pid)
        return 0

    def info(self) -> Dict[str, Any]:
        """Static facts about this rank (for logs): rank, stage, device, parameter count, start-up seconds."""
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.module.parameters())
        return {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "device": str(self.device), "num_params": n, "init_seconds": dict(self.init_seconds),
                "ds_config": copy.deepcopy(self.ds_config)}

    @property
    def module(self):
        return self.engine.module

    # ------------------------------------------------------------------ batching
    def _micro_batches(self, batch: Batch) -> List[Optional[np.ndarray]]:
        """Local micro-batches (index arrays into ``batch``), padded to the group-wide count with None (a
        placeholder micro-batch). Sorting by length keeps padding low; the loss is a sum over samples, so order
        does not matter."""
        order = np.argsort(batch.sizes(), kind="stable")
        mbs: List[Optional[np.ndarray]] = [order[j:j + self.micro_batch_size]
                                           for j in range(0, len(order), self.micro_batch_size)]
        n_global = int(self._all_reduce([float(len(mbs))], op="max")[0])
        return mbs + [None] * (n_global - len(mbs))

    def _collate(self, batch: Batch, mb: Optional[np.ndarray]):
        if mb is None:  # padding micro-batch: runs the collectives, contributes zero
            return collate(Batch.dummy(self.pad_id), pad_id=self.pad_id, real=False, device=self.device)
        return collate(batch.select(mb), pad_id=self.pad_id, device=self.device)

    def _all_reduce(self, values: Union[Sequence[float], torch.Tensor], *, op: str = "sum") -> List[float]:
        import torch.distributed as dist

        t = torch.as_tensor(values, dtype=torch.float64 if self.spec.kind == "cpu" else torch.float32)
        t = t.to(self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return [float(x) for x in t.tolist()]

    def _response_logits(self, model, c):
        # Only the positions from the earliest response on reach the head (HF's logits_to_keep keeps the last N):
        # with a 150k vocabulary the prompt's logits would be most of the activation memory and of the head's
        # FLOPs, and nothing reads them.
        first = int(c.pos.min()) if c.pos.numel() else 0
        keep = c.ids.shape[1] - first
        logits = model(input_ids=c.ids, attention_mask=c.attn, use_cache=False, logits_to_keep=keep).logits
        return logits.gather(1, (c.pos - first).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def _global_denominators(self, batch: Batch):
        R = batch.response_lens
        n_seq, n_tok = self._all_reduce([len(batch), float(R.sum())], op="sum")
        t_max = self._all_reduce([float(R.max()) if len(R) else 0.0], op="max")[0]
        if n_seq == 0:
            raise ValueError("empty batch: no samples on any rank")
        mrl = self.loss_opts.max_response_len
        return dict(num_seqs=n_seq, num_tokens=n_tok, max_len=float(mrl) if mrl else t_max)

    # ------------------------------------------------------------------ training
    # per-micro-batch sums, all-reduced once per update: loss terms, token-weighted means, entropy, tokens
    _SUMS = ("loss", "pg_loss", "kl_loss", "clip", "clip_lower", "approx_kl", "ratio", "entropy", "kl", "tok")

    def _forward_backward(self, batch: Batch) -> Dict[str, Any]:
        """Accumulate the full-batch loss gradient over micro-batches (no optimizer step); returns group metrics."""
        L = self.loss_opts
        denoms = self._global_denominators(batch)
        mbs = self._micro_batches(batch)
        self.engine.train()
        acc = torch.zeros(len(self._SUMS), dtype=torch.float64)
        rmin, rmax = math.inf, -math.inf
        for j, mb in enumerate(mbs):
            self.engine.set_gradient_accumulation_boundary(j == len(mbs) - 1)
            c = self._collate(batch, mb)
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = token_logprobs(self._response_logits(self.ref, c), c.tgt, temperature=L.temperature)
            lp, ent = token_logprobs_and_entropy(self._response_logits(self.engine, c), c.tgt,
                                                 temperature=L.temperature, entropy=L.compute_entropy)
            old = torch.where(c.has_old[:, None], c.old, lp.detach())
            total, pg, ref_term, m = learner_loss(lp, old, c.adv, c.mask, opts=L, is_weights=c.isw,
                                                  ref_logprobs=ref_lp, **denoms)
            # DeepSpeed averages over data-parallel ranks; ×W turns that average back into the sum over ranks.
            self.engine.backward(total * self.world_size, scale_wrt_gas=False)
            with torch.no_grad():
                zero = torch.zeros((), device=total.device)
                v = torch.stack([
                    total.detach(), pg.detach(), ref_term.detach() if ref_term is not None else zero,
                    m["pg_clipfrac"], m["pg_clipfrac_lower"], m["approx_kl"], m["ratio_mean"],
                    (ent * c.mask).sum() if ent is not None else zero, m.get("ref_sum", zero),
                    m["num_tokens"]]).to("cpu", torch.float64)
                v[3:7] *= v[9]  # token means → token sums, so the group mean weighs every token once
                acc += v
                if v[9] > 0:
                    rmin, rmax = min(rmin, float(m["ratio_min"])), max(rmax, float(m["ratio_max"]))
        sums = dict(zip(self._SUMS, self._all_reduce(acc, op="sum")))
        rmin = self._all_reduce([rmin], op="min")[0]
        rmax = self._all_reduce([rmax], op="max")[0]
        tok = max(sums["tok"], 1.0)
        metrics: Dict[str, Any] = {
            "loss": sums["loss"], "pg_loss": sums["pg_loss"], "kl_loss": sums["kl_loss"],
            "pg_clipfrac": sums["clip"] / tok, "pg_clipfrac_lower": sums["clip_lower"] / tok,
            "approx_kl": sums["approx_kl"] / tok, "ratio_mean": sums["ratio"] / tok,
            "ratio_min": rmin if math.isfinite(rmin) else 1.0, "ratio_max": rmax if math.isfinite(rmax) else 1.0,
            "tokens": sums["tok"], "samples": denoms["num_seqs"], "micro_batches": float(len(mbs)),
        }
        if self.ref is not None:
            metrics["kl"] = sums["kl"] / tok  # the ref_penalty's per-token mean (KL or JS)
        # the field stays in the record when entropy is off (None), so every run's metrics have the same keys
        metrics["entropy"] = sums["entropy"] / tok if L.compute_entropy else None
        return metrics

    def train_step(self, batch: Union[Batch, Sequence[Mapping[str, Any]]], *, step: int) -> Dict[str, Any]:
        """``ppo_epochs`` passes over this rank's shard, each split into ``mini_batches`` optimizer steps (all ranks
        call together). With 1 × 1 (the default) this is one full-batch step, on-policy (ratio 1 at sync).

        Later mini-batches see a policy that already moved, so their ratio against the behaviour logprobs departs
        from 1 and the PPO clip bounds the move. Mini-batches are a seeded shuffle of the shard (same on every
        rerun). Returns group-reduced metrics: means over the updates, the largest gradient norm (the run's guard
        reads it), ratio_min/max over all updates, and ``updates``."""
        t0 = time.perf_counter()
        # a copy of the columns' holder: the off-policy correction replaces columns, never the caller's
        batch = dataclasses.replace(as_batch(batch, where=f"rank {self.rank} batch"))
        is_stats = self._attach_importance_weights(batch) if self.loss_opts.off_policy != "none" else {}
        updates: List[Dict[str, Any]] = []
        for epoch in range(self.opts.ppo_epochs):
            for part in self._mini_batch_split(batch, step=step, epoch=epoch):
                metrics = self._forward_backward(part)
                self.engine.step()
                gn = self.engine.get_global_grad_norm()
                metrics["grad_norm"] = float(gn) if gn is not None else float("nan")
                updates.append(metrics)
        out = updates[0] if len(updates) == 1 else {k: _combine(k, [u[k] for u in updates]) for k in updates[0]}
        out["updates"] = float(len(updates))
        out.update(is_stats)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["step"] = float(step)
        out["step_seconds"] = self._all_reduce([time.perf_counter() - t0], op="max")[0]
        return out

    def _attach_importance_weights(self, batch: Batch) -> Dict[str, float]:
        """Off-policy correction: π_old = the learner's logprobs now (the start of this update) becomes the PPO
        reference, and each token gets w = π_old/μ (μ: the behaviour logprobs the engine sampled with), truncated
        at ``is_cap`` for "tis". Returns group-reduced stats: mean w and the effective sample size (Σw)²/(N Σw²)."""
        prox = torch.from_numpy(self._logprobs_flat(batch))
        has = torch.from_numpy(np.repeat(batch.has_behaviour, batch.response_lens))
        w = importance_weights(prox, torch.tensor(batch.behaviour_logprobs), mode=self.loss_opts.off_policy,
                               cap=self.loss_opts.is_cap, has_behaviour=has)
        batch.behaviour_logprobs = prox.numpy()
        batch.has_behaviour = np.ones(len(batch), dtype=bool)
        batch.is_weights = w.to(torch.float32).numpy()
        s_w, s_w2, n_tok = self._all_reduce([float(w.sum()), float((w * w).sum()), float(w.numel())], op="sum")
        return {"is_weight_mean": s_w / max(n_tok, 1.0),
                "is_ess": (s_w * s_w) / max(n_tok * s_w2, 1e-30) if n_tok else 1.0}

    def _mini_batch_split(self, batch: Batch, *, step: int, epoch: int) -> List[Batch]:
        """This rank's shard in ``mini_batches`` parts (a seeded shuffle; parts may be empty on a small shard, the
        padding micro-batches keep the collectives in step)."""
        k = self.opts.mini_batches
        if k == 1:
            return [batch]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 100_003 + int(step)) * 101 + epoch)
        order = torch.randperm(len(batch), generator=g).numpy()
        size = -(-len(batch) // k) if len(batch) else 0
        return [batch.select(order[j * size:(j + 1) * size]) for j in range(k)]

    @torch.no_grad()
    def _logprobs_flat(self, batch: Batch, *, ref: bool = False, temperature: Optional[float] = None) -> np.ndarray:
        """Logprobs of every response token (flat, in the batch's order), float32."""
        temperature = self.loss_opts.temperature if temperature is None else float(temperature)
        if ref and self.ref is None:
            raise ValueError("compute_logprobs(ref=True) needs ref_model=True")
        model = self.ref if ref else self.engine
        model.eval()
        out = np.zeros(int(batch.response_lens.sum()), dtype=np.float32)
        starts = np.concatenate([[0], np.cumsum(batch.response_lens)[:-1]]).astype(np.int64)
        for mb in self._micro_batches(batch):
            c = self._collate(batch, mb)
            lp = token_logprobs(self._response_logits(model, c), c.tgt, temperature=temperature).float().cpu()
            if mb is not None:
                R = torch.from_numpy(batch.response_lens[mb])
                keep = torch.arange(lp.shape[1])[None, :] < R[:, None]
                dest = torch.from_numpy(starts[mb])[:, None] + torch.arange(lp.shape[1])[None, :]
                out[dest[keep].numpy()] = lp[keep].numpy()
        self.engine.train()
        return out

    def compute_logprobs(self, batch: Union[Batch, Sequence[Mapping[str, Any]]], *, ref: bool = False,
                         temperature: Optional[float] = None) -> List[List[float]]:
        """Per-token logprobs of each sample's response under the current (or, ``ref=True``, reference) model, at
        the learner's temperature (or ``temperature``: the weight-sync probe compares at 1)."""
        batch = as_batch(batch, where=f"rank {self.rank} batch", default_advantage=0.0)
        return batch.response_rows(self._logprobs_flat(batch, ref=ref, temperature=temperature))

    # ------------------------------------------------------------------ checkpoints and weights out
    def save_checkpoint(self, ckpt_dir: str, *, step: int, client_state: Optional[Mapping[str, Any]] = None) -> str:
        """DeepSpeed checkpoint (model + ZeRO optimizer partitions) under ``ckpt_dir/step_<step>``."""
        state = dict(client_state or {})
        state["step"] = step
        tag = f"step_{step}"
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
        return str(Path(ckpt_dir) / tag)

    def load_checkpoint(self, ckpt_dir: str, *, tag: Optional[str] = None) -> Dict[str, Any]:
        """Restore model and optimizer state (latest tag unless given); returns the saved client_state."""
        if not Path(ckpt_dir).is_dir():
            raise FileNotFoundError(f"checkpoint directory {ckpt_dir!r} does not exist")
        if tag is None and not Path(ckpt_dir, "latest").is_file():
            raise FileNotFoundError(f"no 'latest' file in {ckpt_dir!r}; pass tag=... (e.g. 'step_10')")
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {ckpt_dir!r} (tag={tag!r})")
        return dict(client_state or {})

    def gather_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        return self.exporter.gather_state_dict()

    def publish_weights(self, transport, *, step: int):
        return self.exporter.publish_weights(transport, step=step)

    def export_hf(self, out_dir: str, *, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        return self.exporter.export_hf(out_dir, dtype=dtype)

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _combine(key: str, values: List[Any]) -> Any:
    """One metric over several updates: the largest grad_norm / ratio_max, the smallest ratio_min, else the mean."""
    if any(v is None for v in values):
        return None
    if key in ("grad_norm", "ratio_max"):
        return max(values)
    if key == "ratio_min":
        return min(values)
    return sum(values) / len(values)
