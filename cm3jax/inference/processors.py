"""Logits processors for decoding, composable pure functions on [batch, vocab] scores (docs/paper.md §5).

Guidance combines the streams' log-probabilities: classifier-free guidance `u + s (c - u)`, contrastive decoding
TopK `log p_c - log p_u` on V = {t : p_c(t) >= alpha * (k-th largest p_c)} (-inf elsewhere), and three-stream editing
guidance `u + s_img (img - u) + s_txt (full - img)`. Then temperature, top-k and top-p filter the scores and
`sample` draws a token (greedy at temperature 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def classifier_free_guidance(conditional: jax.Array, unconditional: jax.Array, scale: float) -> jax.Array:
    return unconditional + scale * (conditional - unconditional)


def contrastive_top_k(conditional: jax.Array, unconditional: jax.Array, alpha: float, k: int) -> jax.Array:
    """CD-K on log-probabilities [B, V]."""
    kth = jax.lax.top_k(conditional, k)[0][:, -1:]
    candidates = conditional >= jnp.log(alpha) + kth  # p_c >= alpha * p_c(k-th)
    return jnp.where(candidates, conditional - unconditional, NEG_INF)


def three_stream_guidance(full: jax.Array, image_only: jax.Array, unconditional: jax.Array, image_scale: float,
                          text_scale: float) -> jax.Array:
    return unconditional + image_scale * (image_only - unconditional) + text_scale * (full - image_only)


def guide(stream_logits: jax.Array, options) -> jax.Array:
    """[streams, B, V] logits -> [B, V] scores by options.guidance (stream 0 is the full condition)."""
    logp = jax.nn.log_softmax(stream_logits.astype(jnp.float32), axis=-1)
    if options.guidance == "none":
        return logp[0]
    if options.guidance == "cfg":
        return classifier_free_guidance(logp[0], logp[1], options.cfg_scale)
    if options.guidance == "cdk":
        return contrastive_top_k(logp[0], logp[1], options.cdk_alpha, options.cdk_k)
    if options.guidance == "edit":
        return three_stream_guidance(logp[0], logp[1], logp[2], options.image_scale, options.text_scale)
    raise ValueError(f"unknown guidance {options.guidance!r}")


def top_k_filter(scores: jax.Array, k: int) -> jax.Array:
    """Keeps exactly the k best tokens per row (ties broken by lower id); the rest get -inf."""
    _, keep = jax.lax.top_k(scores, k)
    kept = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], keep].set(True)
    return jnp.where(kept, scores, NEG_INF)


def top_p_filter(scores: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of best tokens whose probability reaches p (at least one token)."""
    order = jnp.argsort(-scores, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(scores, axis=-1), order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    kept = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(kept, scores, NEG_INF)


def sample(scores: jax.Array, options, rng: jax.Array) -> jax.Array:
    """One token per row from [B, V] scores after temperature, top-k and top-p; argmax at temperature 0."""
    if options.temperature == 0:
        return jnp.argmax(scores, axis=-1)
    scores = scores / options.temperature
    if options.top_k > 0:
        scores = top_k_filter(scores, options.top_k)
    if options.top_p < 1.0:
        scores = top_p_filter(scores, options.top_p)
    return jax.random.categorical(rng, scores, axis=-1)
