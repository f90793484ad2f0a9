"""DeepSpeed ZeRO learner: W ranks forming one torch.distributed group, PPO-clipped policy loss, optional KL.

``LearnerWorker`` is a plain class (one per rank; usable without Ray); ``LearnerGroup`` starts W of them as Ray
actors, shards each batch across the ranks and returns the reduced metrics.

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

Batch format (one rank's shard, a list of mappings): ``prompt_token_ids`` (list[int], non-empty),
``response_token_ids`` (list[int]), ``behaviour_logprobs`` (logprobs of the response tokens under the policy that
sampled them, same length as ``response_token_ids``; missing/``None`` → on-policy, ratio 1 — they must be in the
same convention as the learner's ``temperature``: vLLM's default ``raw_logprobs`` ignore sampling temperature, so
pair them with ``temperature=1.0``), ``advantage`` (float, the shaped advantage of the sample).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from cluster.devices import device_spec, set_process_env
from passk_rl.losses import AGGREGATIONS, KL_ESTIMATORS, aggregate, kl_penalty, policy_loss, token_entropy, \
    token_logprobs

OPTIMIZERS = ("adamw", "sgd")
# How a batch sampled by an older policy μ is corrected: "none" (PPO ratio against μ's logprobs, as on-policy),
# "decoupled_ppo" (ratio and clip against the learner's own logprobs at the start of the update, π_old, times the
# importance weight π_old/μ per token) or "tis" (the same weight truncated at is_cap).
OFF_POLICY = ("none", "tis", "decoupled_ppo")


def _deep_update(base: dict, override: Mapping) -> dict:
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def validate_batch(batch: Sequence[Mapping[str, Any]], *, where: str = "batch") -> List[dict]:
    """Check the learner batch format; returns normalised dicts. Raises ValueError naming the sample and key."""
    if not isinstance(batch, (list, tuple)):
        raise ValueError(f"{where} must be a list of samples (dicts), got {type(batch).__name__}")
    out = []
    for i, s in enumerate(batch):
        if not isinstance(s, Mapping):
            raise ValueError(f"{where}[{i}] must be a dict, got {type(s).__name__}")
        for key in ("prompt_token_ids", "response_token_ids", "advantage"):
            if key not in s:
                raise ValueError(f"{where}[{i}] is missing key {key!r} (has {sorted(s)})")
        prompt = [int(t) for t in s["prompt_token_ids"]]
        resp = [int(t) for t in s["response_token_ids"]]
        if not prompt:
            raise ValueError(f"{where}[{i}]: prompt_token_ids is empty (need at least one token to condition on)")
        lp = s.get("behaviour_logprobs")
        if lp is not None:
            lp = [float(x) for x in lp]
            if len(lp) != len(resp):
                raise ValueError(f"{where}[{i}]: behaviour_logprobs has {len(lp)} entries but response_token_ids "
                                 f"has {len(resp)}")
            if any(math.isnan(x) for x in lp):
                raise ValueError(f"{where}[{i}]: behaviour_logprobs contains NaN")
        adv = float(s["advantage"])
        if not math.isfinite(adv):
            raise ValueError(f"{where}[{i}]: advantage is not finite ({adv})")
        out.append({"prompt_token_ids": prompt, "response_token_ids": resp, "behaviour_logprobs": lp,
                    "advantage": adv})
    return out


def shard_by_tokens(samples: Sequence[Mapping[str, Any]], world_size: int) -> List[List[int]]:
    """Split sample indices over ``world_size`` ranks balancing prompt+response tokens (greedy LPT).

    Returns per-rank index lists, each in ascending order. Groups need not stay together: advantages are already
    computed per sample, and the loss is a sum over samples.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = [len(s["prompt_token_ids"]) + len(s["response_token_ids"]) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (-sizes[i], i))
    loads = [0] * world_size
    counts = [0] * world_size
    shards: List[List[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda j: (loads[j], counts[j], j))
        shards[r].append(i)
        loads[r] += sizes[i]
        counts[r] += 1
    return [sorted(s) for s in shards]


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


class LearnerWorker:
    """One learner rank: an HF causal LM wrapped in a DeepSpeed ZeRO-2/3 engine.

    All ranks of a group must call the collective methods (``train_step``, ``compute_logprobs``,
    ``loss_gradient``, ``gather_state_dict``, ``publish_weights``, ``save_checkpoint``, ``load_checkpoint``,
    ``export_hf``) together, each with its own shard.

    Gradient accumulation is derived per step: ceil(max-over-ranks local samples / ``micro_batch_size``)
    micro-batches, one optimizer step per ``train_step``.
    """

    def __init__(self, model_path: str, *, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, local_rank: int = 0, device: str = "cpu", zero_stage: int = 2,
                 lr: float = 1e-6, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, grad_clip: float = 1.0, micro_batch_size: int = 4, bf16: bool = False,
                 seed: int = 0, optimizer: str = "adamw", clip_low: float = 0.2, clip_high: float = 0.2,
                 dual_clip: Optional[float] = None, aggregation: str = "seq_mean_token_sum",
                 max_response_len: Optional[int] = None, temperature: float = 1.0, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", ref_model: bool = False, gradient_checkpointing: bool = False,
                 compute_entropy: bool = True, ds_config_overrides: Optional[Mapping[str, Any]] = None,
                 ppo_epochs: int = 1, mini_batches: int = 1, off_policy: str = "none", is_cap: float = 2.0):
        if zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; allowed: {list(AGGREGATIONS)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; allowed: {list(KL_ESTIMATORS)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {list(OPTIMIZERS)}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if ppo_epochs < 1 or mini_batches < 1:
            raise ValueError(f"ppo_epochs and mini_batches must be >= 1, got {ppo_epochs}, {mini_batches}")
        if off_policy not in OFF_POLICY:
            raise ValueError(f"unknown off_policy {off_policy!r}; allowed: {list(OFF_POLICY)}")
        if not is_cap > 1.0:
            raise ValueError(f"is_cap must be > 1, got {is_cap}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_coef > 0 and not ref_model:
            raise ValueError("kl_coef > 0 needs a frozen reference model: set ref_model=True")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path {model_path!r} has no config.json (expected an HF model directory)")

        self.model_path = str(model_path)
        self.rank, self.world_size = rank, world_size
        self.zero_stage = zero_stage
        self.micro_batch_size = micro_batch_size
        self.ppo_epochs, self.mini_batches = int(ppo_epochs), int(mini_batches)
        self.off_policy, self.is_cap = off_policy, float(is_cap)
        self.seed = int(seed)
        self.bf16 = bf16
        self.loss_kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation)
        self.aggregation = aggregation
        self.max_response_len = max_response_len
        self.temperature = temperature
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.compute_entropy = compute_entropy

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
        t1 = time.perf_counter()
        deepspeed.init_distributed(dist_backend=self.spec.dist_backend)
        t2 = time.perf_counter()
        acc = get_accelerator()
        if self.spec.kind != "cpu":
            acc.set_device(local_rank)
        self.device = torch.device(acc.current_device_name()) if self.spec.kind != "cpu" else torch.device("cpu")
        torch.manual_seed(seed)

        from transformers import AutoTokenizer

        self.ds_config = self._build_ds_config(grad_clip=grad_clip, overrides=ds_config_overrides)
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = self._load_model(dtype)
        t3 = time.perf_counter()
        model.config.use_cache = False
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception:  # a weights-only directory is still trainable; export_hf then skips the tokenizer
            self.tokenizer = None
        self.pad_id = self._pad_id(model)

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # AdamW convention: no weight decay on 1-D tensors (norm weights, biases).
        decay = [p for n, p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for n, p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
        else:  # plain SGD: exact, scale-sensitive updates (Δθ = −lr·g); useful for checks and ablations
            opt = torch.optim.SGD(groups, lr=lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        t4 = time.perf_counter()

        self.ref = None
        if ref_model:
            ref = self._load_model(dtype)
            ref.config.use_cache = False
            ref.requires_grad_(False)
            ref.eval()
            if zero_stage == 3:
                ref_cfg = {k: v for k, v in self.ds_config.items() if k not in ("gradient_clipping",)}
                ref_cfg["zero_optimization"] = {k: v for k, v in self.ds_config["zero_optimization"].items()
                                                if k.startswith("stage")}
                self.ref, *_ = deepspeed.initialize(model=ref, config=ref_cfg)
                self.ref.eval()
            else:
                self.ref = ref.to(self.device)
        # where start-up time goes (import / rendezvous / load / engine build / reference), for the launch log
        self.init_seconds = {"import": t1 - t0, "init_distributed": t2 - t1, "load_model": t3 - t2,
                             "deepspeed_initialize": t4 - t3, "ref_model": time.perf_counter() - t4}

    # ------------------------------------------------------------------ setup helpers
    def _build_ds_config(self, *, grad_clip: float, overrides: Optional[Mapping[str, Any]]) -> dict:
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
            "gradient_clipping": float(grad_clip),
            "zero_optimization": zero,
            "bf16": {"enabled": bool(self.bf16)},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if self.bf16:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        if overrides:
            _deep_update(cfg, overrides)
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
        files = _safetensors_files(self.model_path)
        where = {}
        for f in files:
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
    def _collate(self, samples: Sequence[dict], real: Sequence[bool]):
        """Right-padded (b, L) inputs and (b, T) response targets/mask for one micro-batch."""
        b = len(samples)
        L = max(len(s["prompt_token_ids"]) + len(s["response_token_ids"]) for s in samples)
        T = max(1, max(len(s["response_token_ids"]) for s in samples))
        ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, L), dtype=torch.long)
        pos = torch.zeros((b, T), dtype=torch.long)
        tgt = torch.full((b, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, T), dtype=torch.float32)
        old = torch.zeros((b, T), dtype=torch.float32)
        has_old = torch.ones((b,), dtype=torch.bool)
        adv = torch.zeros((b,), dtype=torch.float32)
        isw = torch.ones((b, T), dtype=torch.float32)
        for i, s in enumerate(samples):
            p, r = s["prompt_token_ids"], s["response_token_ids"]
            P, R = len(p), len(r)
            ids[i, :P + R] = torch.tensor(p + r, dtype=torch.long)
            attn[i, :P + R] = 1
            # logits at position P−1+t predict response token t; padded slots point at the last real position
            pos[i] = torch.clamp(torch.arange(T) + P - 1, max=P + R - 1)
            if R:
                tgt[i, :R] = torch.tensor(r, dtype=torch.long)
                if real[i]:
                    mask[i, :R] = 1.0
                if s["behaviour_logprobs"] is not None:
                    old[i, :R] = torch.tensor(s["behaviour_logprobs"], dtype=torch.float32)
                if s.get("is_weights") is not None:
                    isw[i, :R] = torch.tensor(s["is_weights"], dtype=torch.float32)
            has_old[i] = s["behaviour_logprobs"] is not None
            adv[i] = s["advantage"] if real[i] else 0.0
        d = self.device
        return (ids.to(d), attn.to(d), pos.to(d), tgt.to(d), mask.to(d), old.to(d), has_old.to(d), adv.to(d),
                isw.to(d))

    def _micro_batches(self, samples: List[dict]):
        """Local micro-batches (lists of indices into ``samples``), padded to the group-wide count with dummies.

        Sorting by length keeps padding low; the loss is a sum over samples, so order does not matter.
        """
        order = sorted(range(len(samples)),
                       key=lambda i: len(samples[i]["prompt_token_ids"]) + len(samples[i]["response_token_ids"]))
        mbs = [order[j:j + self.micro_batch_size] for j in range(0, len(order), self.micro_batch_size)]
        n_global = int(self._all_reduce([float(len(mbs))], op="max")[0])
        return mbs + [None] * (n_global - len(mbs))

    def _dummy_sample(self) -> dict:
        return {"prompt_token_ids": [self.pad_id], "response_token_ids": [self.pad_id], "behaviour_logprobs": None,
                "advantage": 0.0}

    def _mb_samples(self, samples, mb):
        if mb is None:  # padding micro-batch: runs the collectives, contributes zero
            return [self._dummy_sample()], [False]
        return [samples[i] for i in mb], [True] * len(mb)

    def _all_reduce(self, values: Sequence[float], *, op: str = "sum") -> List[float]:
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64 if self.spec.kind == "cpu" else torch.float32,
                         device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return [float(x) for x in t.tolist()]

    def _response_logits(self, model, ids, attn, pos):
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        logits = out.logits
        V = logits.shape[-1]
        return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, V))

    def _global_denominators(self, samples: List[dict]):
        n_seq, n_tok = self._all_reduce([len(samples), sum(len(s["response_token_ids"]) for s in samples)], op="sum")
        t_max = self._all_reduce([max([len(s["response_token_ids"]) for s in samples], default=0)], op="max")[0]
        if n_seq == 0:
            raise ValueError("empty batch: no samples on any rank")
        max_len = float(self.max_response_len) if self.max_response_len else t_max
        return n_seq, n_tok, max_len

    # ------------------------------------------------------------------ training
    def _forward_backward(self, samples: List[dict]) -> Dict[str, float]:
        """Accumulate the full-batch loss gradient over micro-batches (no optimizer step); returns group metrics."""
        n_seq, n_tok, max_len = self._global_denominators(samples)
        mbs = self._micro_batches(samples)
        self.engine.train()
        acc = dict.fromkeys(["loss", "pg_loss", "kl_loss", "clip", "clip_lower", "approx_kl", "ratio", "entropy",
                             "kl", "tok"], 0.0)
        rmin, rmax = math.inf, -math.inf
        denoms = dict(num_seqs=n_seq, num_tokens=n_tok, max_len=max_len)
        for j, mb in enumerate(mbs):
            self.engine.set_gradient_accumulation_boundary(j == len(mbs) - 1)
            mb_samples, real = self._mb_samples(samples, mb)
            ids, attn, pos, tgt, mask, old, has_old, adv, isw = self._collate(mb_samples, real)
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = token_logprobs(self._response_logits(self.ref, ids, attn, pos), tgt,
                                            temperature=self.temperature)
            logits = self._response_logits(self.engine, ids, attn, pos)
            lp = token_logprobs(logits, tgt, temperature=self.temperature)
            old = torch.where(has_old[:, None], old, lp.detach())
            pg, m = policy_loss(lp, old, adv, mask, clip_low=self.loss_kwargs["clip_low"],
                                clip_high=self.loss_kwargs["clip_high"], dual_clip=self.loss_kwargs["dual_clip"],
                                aggregation=self.aggregation,
                                is_weights=isw if self.off_policy != "none" else None, **denoms)
            total = pg
            kl_term = None
            if ref_lp is not None:
                kl_tok = kl_penalty(lp, ref_lp, mask, estimator=self.kl_estimator)
                kl_term = aggregate(kl_tok, mask, mode=self.aggregation, **denoms)
                if self.kl_coef > 0:
                    total = total + self.kl_coef * kl_term
                acc["kl"] += float(kl_tok.detach().sum())
            # DeepSpeed averages over data-parallel ranks; ×W turns that average back into the sum over ranks.
            self.engine.backward(total * self.world_size, scale_wrt_gas=False)

            ntok = float(m["num_tokens"])
            acc["loss"] += float(total.detach())
            acc["pg_loss"] += float(pg.detach())
            acc["kl_loss"] += float(kl_term.detach()) if kl_term is not None else 0.0
            acc["clip"] += float(m["pg_clipfrac"]) * ntok
            acc["clip_lower"] += float(m["pg_clipfrac_lower"]) * ntok
            acc["approx_kl"] += float(m["approx_kl"]) * ntok
            acc["ratio"] += float(m["ratio_mean"]) * ntok
            acc["tok"] += ntok
            if ntok > 0:
                rmin, rmax = min(rmin, float(m["ratio_min"])), max(rmax, float(m["ratio_max"]))
            if self.compute_entropy and ntok > 0:
                with torch.no_grad():
                    ent = token_entropy(logits.detach(), temperature=self.temperature)
                    acc["entropy"] += float((ent * mask).sum())
        keys = list(acc)
        sums = dict(zip(keys, self._all_reduce([acc[k] for k in keys], op="sum")))
        rmin = self._all_reduce([rmin], op="min")[0]
        rmax = self._all_reduce([rmax], op="max")[0]
        tok = max(sums["tok"], 1.0)
        metrics = {
            "loss": sums["loss"], "pg_loss": sums["pg_loss"], "kl_loss": sums["kl_loss"],
            "pg_clipfrac": sums["clip"] / tok, "pg_clipfrac_lower": sums["clip_lower"] / tok,
            "approx_kl": sums["approx_kl"] / tok, "ratio_mean": sums["ratio"] / tok,
            "ratio_min": rmin if math.isfinite(rmin) else 1.0, "ratio_max": rmax if math.isfinite(rmax) else 1.0,
            "tokens": sums["tok"], "samples": n_seq, "micro_batches": float(len(mbs)),
        }
        if self.ref is not None:
            metrics["kl"] = sums["kl"] / tok
        if self.compute_entropy:
            metrics["entropy"] = sums["entropy"] / tok
        return metrics

    def train_step(self, batch: Sequence[Mapping[str, Any]], *, step: int) -> Dict[str, float]:
        """``ppo_epochs`` passes over this rank's shard, each split into ``mini_batches`` optimizer steps (all ranks
        call together). With 1 × 1 (the default) this is one full-batch step, on-policy (ratio 1 at sync).

        Later mini-batches see a policy that already moved, so their ratio against the behaviour logprobs departs
        from 1 and the PPO clip bounds the move. Mini-batches are a seeded shuffle of the shard (same on every
        rerun). Returns group-reduced metrics: means over the updates, the largest gradient norm (the run's guard
        reads it), ratio_min/max over all updates, and ``updates``."""
        t0 = time.perf_counter()
        samples = validate_batch(batch, where=f"rank {self.rank} batch")
        is_stats = self._attach_importance_weights(samples) if self.off_policy != "none" else {}
        updates: List[Dict[str, float]] = []
        for epoch in range(self.ppo_epochs):
            for part in self._mini_batch_split(samples, step=step, epoch=epoch):
                metrics = self._forward_backward(part)
                self.engine.step()
                gn = self.engine.get_global_grad_norm()
                metrics["grad_norm"] = float(gn) if gn is not None else float("nan")
                updates.append(metrics)
        out = updates[0] if len(updates) == 1 else {
            k: (max if k == "grad_norm" or k == "ratio_max" else min if k == "ratio_min" else
                (lambda v: sum(v) / len(v)))([u[k] for u in updates]) for k in updates[0]}
        out["updates"] = float(len(updates))
        out.update(is_stats)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["step"] = float(step)
        out["step_seconds"] = self._all_reduce([time.perf_counter() - t0], op="max")[0]
        return out

    def _attach_importance_weights(self, samples: List[dict]) -> Dict[str, float]:
        """Off-policy correction: π_old = the learner's logprobs now (the start of this update) becomes the PPO
        reference, and each token gets w = π_old/μ (μ: the behaviour logprobs the engine sampled with), truncated
        at ``is_cap`` for "tis". Returns group-reduced stats: mean w and the effective sample size (Σw)²/(N Σw²)."""
        prox = self.compute_logprobs(samples)
        s_w = s_w2 = n_tok = 0.0
        for s, lp in zip(samples, prox):
            mu = s["behaviour_logprobs"]
            w = [1.0] * len(lp) if mu is None else [math.exp(max(min(a - b, 20.0), -20.0)) for a, b in zip(lp, mu)]
            if self.off_policy == "tis":
                w = [min(x, self.is_cap) for x in w]
            s["behaviour_logprobs"] = lp
            s["is_weights"] = w
            s_w += sum(w)
            s_w2 += sum(x * x for x in w)
            n_tok += len(w)
        s_w, s_w2, n_tok = self._all_reduce([s_w, s_w2, n_tok], op="sum")
        return {"is_weight_mean": s_w / max(n_tok, 1.0),
                "is_ess": (s_w * s_w) / max(n_tok * s_w2, 1e-30) if n_tok else 1.0}

    def _mini_batch_split(self, samples: List[dict], *, step: int, epoch: int) -> List[List[dict]]:
        """This rank's shard in ``mini_batches`` parts (a seeded shuffle; parts may be empty on a small shard, the
        padding micro-batches keep the collectives in step)."""
        if self.mini_batches == 1:
            return [samples]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 100_003 + int(step)) * 101 + epoch)
        order = torch.randperm(len(samples), generator=g).tolist()
        size = -(-len(samples) // self.mini_batches) if samples else 0
        return [[samples[i] for i in order[j * size:(j + 1) * size]] for j in range(self.mini_batches)]

    def loss_gradient(self, batch: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, torch.Tensor]]:
        """Full-batch loss gradient (HF names → fp32 CPU tensors) on rank 0, without an optimizer step.

        Runs exactly the ``train_step`` forward/backward path, reads the reduced gradient (before clipping),
        then discards it. Collective: all ranks call; ranks other than 0 return None.
        """
        from deepspeed.utils import safe_get_full_grad

        samples = validate_batch(batch, where=f"rank {self.rank} batch")
        self._forward_backward(samples)
        grads = {}
        for name, p in self.module.named_parameters():
            g = safe_get_full_grad(p)
            if self.rank == 0:
                grads[name] = (torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) if g is None
                               else g.detach().to("cpu", torch.float32, copy=True))
        self.optimizer.zero_grad()
        self.engine.zero_grad()
        return grads if self.rank == 0 else None

    @torch.no_grad()
    def compute_logprobs(self, batch: Sequence[Mapping[str, Any]], *, ref: bool = False,
                         temperature: Optional[float] = None) -> List[List[float]]:
        """Per-token logprobs of each sample's response under the current (or, ``ref=True``, reference) model, at
        the learner's temperature (or ``temperature``: the weight-sync probe compares at 1)."""
        temperature = self.temperature if temperature is None else float(temperature)
        samples = validate_batch([{**s, "advantage": s.get("advantage", 0.0)} for s in batch],
                                 where=f"rank {self.rank} batch")
        if ref and self.ref is None:
            raise ValueError("compute_logprobs(ref=True) needs ref_model=True")
        model = self.ref if ref else self.engine
        model.eval()
        out: List[Optional[List[float]]] = [None] * len(samples)
        for mb in self._micro_batches(samples):
            mb_samples, real = self._mb_samples(samples, mb)
            ids, attn, pos, tgt, *_ = self._collate(mb_samples, real)
            lp = token_logprobs(self._response_logits(model, ids, attn, pos), tgt, temperature=temperature)
            if mb is not None:
                for row, i in enumerate(mb):
                    out[i] = lp[row, :len(samples[i]["response_token_ids"])].float().cpu().tolist()
        self.engine.train()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ weights out
    def gather_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Full HF-named fp32 CPU state dict on rank 0 (None elsewhere). Collective under ZeRO-3.

        Names follow ``model.named_parameters()`` (tied weights appear once, as ``save_pretrained`` writes them)
        plus persistent buffers. Tensors are copies: later training does not change a published dict.
        """
        sd: Dict[str, torch.Tensor] = {}
        named = list(self.module.named_parameters())
        if self.zero_stage == 3:
            # Gather in buckets so peak memory is one bucket, not the whole model, per rank.
            bucket, size, limit = [], 0, int(2e8)
            for i, (name, p) in enumerate(named):
                bucket.append((name, p))
                size += int(getattr(p, "ds_numel", p.numel()))
                if size >= limit or i == len(named) - 1:
                    with self._ds.zero.GatheredParameters([q for _, q in bucket], modifier_rank=None):
                        if self.rank == 0:
                            for n, q in bucket:
                                sd[n] = q.detach().to("cpu", torch.float32, copy=True)
                    bucket, size = [], 0
        elif self.rank == 0:
            for name, p in named:
                sd[name] = p.detach().to("cpu", torch.float32, copy=True)
        if self.rank != 0:
            return None
        persistent = set(self.module.state_dict().keys())
        for name, b in self.module.named_buffers():
            if name in persistent:
                sd[name] = b.detach().to("cpu", torch.float32, copy=True)
        return sd

    def published_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        """What a weight sync carries, in send order: ``named_parameters()`` (tied weights once, as
        ``save_pretrained`` writes them) then the persistent buffers. Under ZeRO-3 the parameters are partitioned
        (``ds_shape`` is their full shape)."""
        named: List[Tuple[str, torch.Tensor]] = list(self.module.named_parameters())
        persistent = set(self.module.state_dict().keys())
        named += [(n, b) for n, b in self.module.named_buffers() if n in persistent]
        return named

    def gathered(self, params: List[torch.nn.Parameter]):
        """Context in which ``params`` are whole on every rank: ZeRO-3's ``GatheredParameters`` (collective: all
        ranks enter it together), a no-op otherwise."""
        if self.zero_stage == 3 and params:
            return self._ds.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    # A streaming transport's open sending end on rank 0, kept between syncs (the transport owns it).
    weight_sender: Any = None

    def publish_weights(self, transport, *, step: int):
        """Hand the current weights to ``transport`` as version ``step`` (all ranks call together); rank 0 returns
        the handle, the others None. How they travel is the transport's business (``publish_from``)."""
        return transport.publish_from(self, step=step)

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

    def export_hf(self, out_dir: str, *, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Write an HF model directory (config, safetensors, tokenizer, generation config) on rank 0.

        ``dtype`` defaults to the dtype the source model declares (its config's ``dtype``), so an fp32 model
        stays fp32. Loadable by transformers and vLLM. Collective: all ranks call.
        """
        sd = self.gather_state_dict()
        if self.rank == 0:
            from transformers import AutoConfig, GenerationConfig

            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            cfg = AutoConfig.from_pretrained(self.model_path)
            if dtype is None:
                dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
                if isinstance(dtype, str):
                    dtype = getattr(torch, dtype)
            sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
            self.module.save_pretrained(str(out), state_dict=sd, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(out))
            try:
                GenerationConfig.from_pretrained(self.model_path).save_pretrained(str(out))
            except OSError:
                pass  # source had no generation_config.json
        self._barrier()
        return str(out_dir) if self.rank == 0 else None

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- Ray


class LearnerActor:
    """Thin Ray wrapper: created empty, so rank 0 can report its address/port before the group initialises."""

    def __init__(self):
        self.worker: Optional[LearnerWorker] = None

    def address_and_free_port(self):
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_worker(self, model_path: str, **kwargs) -> bool:
        self.worker = LearnerWorker(model_path, **kwargs)
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, *args, **kwargs):
        if self.worker is None:
            raise RuntimeError("learner worker not initialised")
        return getattr(self.worker, method)(*args, **kwargs)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


class LearnerGroup:
    """W ``LearnerWorker`` ranks as Ray actors forming one DeepSpeed data-parallel group.

    ``placement_group``: optional Ray placement group whose bundle ``i`` hosts rank ``i``. Each rank reserves
    ``num_cpus_per_rank`` CPUs plus one device of the kind's Ray resource (GPU / NPU) when the device is not CPU.
    ``worker_kwargs`` go to :class:`LearnerWorker` (zero_stage, lr, micro_batch_size, aggregation, …).
    """

    def __init__(self, world_size: int, model_path: str, *, device: str = "cpu", num_cpus_per_rank: float = 0.5,
                 placement_group=None, **worker_kwargs):
        import ray

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        for k in ("rank", "world_size", "master_addr", "master_port", "local_rank"):
            if k in worker_kwargs:
                raise ValueError(f"LearnerGroup sets {k!r} itself; do not pass it")
        spec = device_spec(device)
        self.world_size = world_size
        self.device = device
        remote_cls = ray.remote(LearnerActor)
        self.actors = []
        for r in range(world_size):
            opts: Dict[str, Any] = {"num_cpus": num_cpus_per_rank}
            if spec.ray_resource == "GPU":
                opts["num_gpus"] = 1
            elif spec.ray_resource:
                opts["resources"] = {spec.ray_resource: 1}
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=r)
            self.actors.append(remote_cls.options(**opts).remote())
        addr, port = ray.get(self.actors[0].address_and_free_port.remote())
        # Accelerator ranks see exactly one device (Ray sets the visible-devices variable), hence local rank 0.
        ray.get([a.init_worker.remote(model_path, rank=r, world_size=world_size, master_addr=addr,
                                      master_port=port, local_rank=r if spec.kind == "cpu" else 0, device=device,
                                      **worker_kwargs)
                 for r, a in enumerate(self.actors)])

    # LearnerConfig fields that place the ranks rather than configure one (LearnerGroup's own arguments)
    PLACEMENT_FIELDS = ("world_size", "num_cpus_per_rank")

    @classmethod
    def from_config(cls, cfg: Any, model_path: str, *, placement_group=None) -> "LearnerGroup":
        """The group a run's config asks for: every ``cfg.learner`` field is passed by name (a new LearnerConfig
        field that LearnerWorker does not take fails here, loudly), plus what follows from other sections."""
        import dataclasses

        L = cfg.learner
        worker = {f.name: getattr(L, f.name) for f in dataclasses.fields(L) if f.name not in cls.PLACEMENT_FIELDS}
        worker.update(
            betas=tuple(L.betas), ds_config_overrides=dict(L.ds_config_overrides) or None,
            # Dr. GRPO's constant normaliser: the longest answer the generator may write, not this batch's longest
            max_response_len=L.max_response_len or cfg.generator.max_tokens,
            ref_model=L.kl_coef > 0, seed=cfg.run.seed, bf16=cfg.model.dtype == "bfloat16",
            # the learner scores the policy the generator samples from: softmax(logits / T), paired with vLLM's
            # processed logprobs (the engine's logprobs_mode follows the same temperature)
            temperature=cfg.generator.temperature,
        )
        return cls(L.world_size, model_path, device=cfg.cluster.device, num_cpus_per_rank=L.num_cpus_per_rank,
                   placement_group=placement_group, **worker)

    def _all(self, method: str, per_rank_args=None, **kwargs) -> list:
        import ray
        refs = []
        for r, a in enumerate(self.actors):
            args = per_rank_args[r] if per_rank_args is not None else ()
            refs.append(a.call.remote(method, *args, **kwargs))
        return ray.get(refs)

    def _shards(self, samples):
        samples = validate_batch(samples)
        shards = shard_by_tokens(samples, self.world_size)
        return samples, shards

    def train_step(self, samples: Sequence[Mapping[str, Any]], *, step: int) -> Dict[str, float]:
        samples, shards = self._shards(samples)
        results = self._all("train_step", [([samples[i] for i in sh],) for sh in shards], step=step)
        return results[0]  # metrics are already all-reduced over ranks inside the workers

    def compute_logprobs(self, samples: Sequence[Mapping[str, Any]], *, ref: bool = False,
                         temperature: Optional[float] = None) -> List[List[float]]:
        samples = validate_batch([{**s, "advantage": s.get("advantage", 0.0)} for s in samples])
        shards = shard_by_tokens(samples, self.world_size)
        parts = self._all("compute_logprobs", [([samples[i] for i in sh],) for sh in shards], ref=ref,
                          temperature=temperature)
        out: List[Optional[List[float]]] = [None] * len(samples)
        for sh, part in zip(shards, parts):
            for i, lp in zip(sh, part):
                out[i] = lp
        return out  # type: ignore[return-value]

    def loss_gradient(self, samples: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        samples, shards = self._shards(samples)
        return self._all("loss_gradient", [([samples[i] for i in sh],) for sh in shards])[0]

    def gather_state_dict(self) -> Dict[str, torch.Tensor]:
        return self._all("gather_state_dict")[0]

    def info(self) -> List[Dict[str, Any]]:
        """Per-rank :meth:`LearnerWorker.info` (includes each rank's start-up seconds)."""
        return self._all("info")

    def node_ids(self) -> List[str]:
        """The Ray node each rank runs on."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def publish_weights(self, transport, step: int):
        return self._all("publish_weights", None, transport=transport, step=step)[0]

    def save_checkpoint(self, ckpt_dir: str, *, step: int, client_state: Optional[Mapping[str, Any]] = None) -> str:
        return self._all("save_checkpoint", None, ckpt_dir=ckpt_dir, step=step, client_state=client_state)[0]

    def load_checkpoint(self, ckpt_dir: str, *, tag: Optional[str] = None) -> Dict[str, Any]:
        return self._all("load_checkpoint", None, ckpt_dir=ckpt_dir, tag=tag)[0]

    def export_hf(self, out_dir: str, *, dtype: Optional[torch.dtype] = None) -> str:
        return self._all("export_hf", None, out_dir=out_dir, dtype=dtype)[0]

    def shutdown(self) -> None:
        import ray
        if not self.actors:
            return
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except Exception:
            pass  # a dead rank must not stop the others from being killed
        for a in self.actors:
            ray.kill(a)
        self.actors = []
