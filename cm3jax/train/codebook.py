"""Dead-code restarts for the VQ-GAN codebook.

Codes that the encoder stops choosing get no gradient and stay dead; a codebook of 8192 then works as one of a few
hundred. Each code's usage is tracked as an exponential moving average relative to uniform use (1.0 = used exactly
as often as a uniform spread of the batch's positions would use it); a code whose average falls below the threshold
is moved onto a latent drawn from the current batch and given a fresh average of 1.0, so it has time to be chosen.
The averages start at 0, so the first step places every code on a latent of the data (a data-dependent
initialisation, as k-means++ seeding without the distance weighting).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def update_code_usage(usage: jax.Array, codes: jax.Array, weights: jax.Array, decay: float) -> jax.Array:
    """EMA of each code's share of this batch's (weighted) positions, relative to a uniform share.

    codes [B, ...] int, weights [B] (0 for padding images).
    """
    codebook_size = usage.shape[0]
    flat_codes = codes.reshape(codes.shape[0], -1)
    counts = jnp.zeros(codebook_size).at[flat_codes].add(jnp.broadcast_to(weights[:, None], flat_codes.shape))
    relative = counts * codebook_size / jnp.maximum(jnp.sum(counts), 1.0)
    return decay * usage + (1.0 - decay) * relative


def restart_dead_codes(codebook: jax.Array, usage: jax.Array, latents: jax.Array, weights: jax.Array,
                       rng: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moves codes whose usage is below threshold onto latents drawn uniformly from the batch's valid positions.

    latents [B, ..., code_dim], weights [B]. Returns (codebook, usage, number of codes restarted). A batch with no
    valid image restarts nothing.
    """
    code_dim = latents.shape[-1]
    flat = latents.reshape(-1, code_dim)
    position_weights = jnp.broadcast_to(weights.reshape((-1,) + (1,) * (latents.ndim - 2)),
                                        latents.shape[:-1]).reshape(-1)
    logits = jnp.where(position_weights > 0, 0.0, -jnp.inf)
    picks = jax.random.categorical(rng, logits, shape=(codebook.shape[0],))
    dead = (usage < threshold) & jnp.any(position_weights > 0)
    codebook = jnp.where(dead[:, None], flat[picks].astype(codebook.dtype), codebook)
    usage = jnp.where(dead, 1.0, usage)
    return codebook, usage, jnp.sum(dead)
