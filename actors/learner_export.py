"""Weights out of a DeepSpeed learner: the gathered state dict, weight publishing (file or streamed) and HF export.

One :class:`WeightExporter` per learner rank, over that rank's engine. Every method is collective: all ranks call
it together (under ZeRO-3 the parameters are gathered, which takes every rank).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch


class WeightExporter:
    def __init__(self, engine: Any, *, rank: int, zero_stage: int, device: torch.device, model_path: str,
                 tokenizer: Any, barrier):
        self.engine, self.rank, self.zero_stage, self.device = engine, rank, zero_stage, device
        self.model_path, self.tokenizer, self._barrier = model_path, tokenizer, barrier
        # a streaming transport's open sending end on rank 0, kept between syncs (the transport owns it)
        self.weight_sender = None

    @property
    def module(self):
        return self.engine.module

    def gathered(self, params):
        """Context in which ``params`` are whole on every rank: ZeRO-3's ``GatheredParameters`` (collective: all
        ranks enter it together), a no-op otherwise."""
        import deepspeed

        return (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if self.zero_stage == 3 and params else contextlib.nullcontext())

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
                    with self.gathered([q for _, q in bucket]):
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

    def publish_weights(self, transport, *, step: int):
        """Hand the current weights to ``transport`` as version ``step`` (all ranks call together); rank 0 returns
        the handle, the others None. How they travel is the transport's business (``transport.publish_from`` calls
        back :meth:`gather_state_dict` or :meth:`published_tensors` / :meth:`gathered`)."""
        return transport.publish_from(self, step=step)

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
