"""Test-only drivers of the learner engine (not part of the product)."""

from __future__ import annotations

from typing import Dict, Optional

import torch


def _rank_loss_gradient(worker, batch) -> Optional[Dict[str, torch.Tensor]]:
    """On one rank: exactly train_step's forward/backward, then the reduced full gradient (before clipping) on
    rank 0, then the gradient is discarded (no optimizer step)."""
    from deepspeed.utils import safe_get_full_grad

    worker._forward_backward(batch)
    grads = {}
    for name, p in worker.module.named_parameters():
        g = safe_get_full_grad(p)
        if worker.rank == 0:
            grads[name] = (torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) if g is None
                           else g.detach().to("cpu", torch.float32, copy=True))
    worker.optimizer.zero_grad()
    worker.engine.zero_grad()
    return grads if worker.rank == 0 else None


def loss_gradient(group, batch) -> Dict[str, torch.Tensor]:
    """Full-batch loss gradient of a LearnerGroup (HF names → fp32 CPU tensors), without an optimizer step."""
    batch, shards = group._shards(batch)
    return group.apply(_rank_loss_gradient, [(batch.select(sh),) for sh in shards])[0]
