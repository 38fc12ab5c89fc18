"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask, from `config.optim`."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to peak_lr, then linear / cosine decay to end_lr_ratio * peak_lr at total_steps."""
    peak, end = optim.peak_lr, optim.peak_lr * optim.end_lr_ratio
    warmup = min(optim.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if optim.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_ratio)
    elif optim.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any, no_decay: list[str]) -> Any:
    """True for parameters that decay: every weight except those whose path contains a `no_decay` substring."""
    def decays(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(pattern in name for pattern in no_decay)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
    """(the optimizer, its learning-rate schedule) of an optim-shaped section (`optim`, `retriever.optim`,
    `vqgan.optim`). The state is (clipping, AdamW); AdamW's decay is masked only when no_weight_decay names
    something, so the state's layout is the one earlier checkpoints of each model hold."""
    schedule = learning_rate_schedule(optim, total_steps)
    no_decay = list(optim.no_weight_decay)
    adamw = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
        mask=(lambda params: weight_decay_mask(params, no_decay)) if no_decay else None,
    )
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule
