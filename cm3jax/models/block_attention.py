"""Block-causal self-attention in plain XLA with a memory-lean backward pass (the `xla` implementation).

XLA has no fused flash-attention kernel on CPU, so this is the flash-attention recipe written as a few large matmuls:
queries are cut into blocks of `block_size`, and block i only meets keys [0, end of block i), so the score blocks above
the diagonal are never computed. A custom VJP keeps q, k, v, the output and each row's log-sum-exp for the backward
pass and recomputes the probabilities there, instead of letting autodiff keep every probability block (about
b * n * t^2 / 2 floats per layer, several times the size of q, k and v at t = 512). The recompute costs one more
score matmul per block; the memory it saves is what the layer scan would otherwise stack per layer and write, fill
and read back every step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

_MASKED = jnp.finfo(jnp.float32).min


def _query_blocks(length: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def _block_scores(q: Array, k: Array, segment_ids: Array | None, start: int, end: int) -> Array:
    """float32 scores of queries [start, end) against keys [0, end), causal and document-masked: [b, n, q, k]."""
    scores = jnp.einsum("bnqh,bnkh->bnqk", q[:, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32)
    allowed = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, start:end, None] == segment_ids[:, None, :end])[:, None]
    return jnp.where(allowed, scores, _MASKED)


def _forward(q: Array, k: Array, v: Array, segment_ids: Array | None, block_size: int) -> tuple[Array, Array]:
    """q (already scaled), k, v [b, n, t, h] -> output [b, n, t, h] and float32 log-sum-exp [b, n, t]."""
    outputs, lses = [], []
    for start, end in _query_blocks(q.shape[2], block_size):
        scores = _block_scores(q, k, segment_ids, start, end)
        row_max = scores.max(-1, keepdims=True)
        unnormalised = jnp.exp(scores - row_max)
        row_sum = unnormalised.sum(-1, keepdims=True)
        out = jnp.einsum("bnqk,bnkh->bnqh", unnormalised.astype(v.dtype), v[:, :, :end],
                         preferred_element_type=jnp.float32)
        outputs.append((out / row_sum).astype(v.dtype))
        lses.append((row_max + jnp.log(row_sum))[..., 0])
    return jnp.concatenate(outputs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, segment_ids: Array | None, block_size: int) -> Array:
    return _forward(q, k, v, segment_ids, block_size)[0]


def _attention_fwd(q, k, v, segment_ids, block_size):
    out, lse = _forward(q, k, v, segment_ids, block_size)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(block_size, residuals, d_out):
    """Per query block: P = exp(S - lse), dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK += dS^T Q."""
    q, k, v, segment_ids, out, lse = residuals
    length = q.shape[2]
    d_out = d_out.astype(v.dtype)
    delta = jnp.einsum("bnth,bnth->bnt", d_out, out, preferred_element_type=jnp.float32)
    d_queries, d_key_parts, d_value_parts = [], [], []
    for start, end in _query_blocks(length, block_size):
        probs = jnp.exp(_block_scores(q, k, segment_ids, start, end) - lse[:, :, start:end, None])
        d_out_block = d_out[:, :, start:end]
        d_value_parts.append((end, jnp.einsum("bnqk,bnqh->bnkh", probs.astype(v.dtype), d_out_block,
                                              preferred_element_type=jnp.float32)))
        d_probs = jnp.einsum("bnqh,bnkh->bnqk", d_out_block, v[:, :, :end], preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - delta[:, :, start:end, None])).astype(q.dtype)
        d_queries.append(jnp.einsum("bnqk,bnkh->bnqh", d_scores, k[:, :, :end], preferred_element_type=jnp.float32))
        d_key_parts.append((end, jnp.einsum("bnqk,bnqh->bnkh", d_scores, q[:, :, start:end],
                                            preferred_element_type=jnp.float32)))

    def sum_prefixes(parts, dtype):
        # Each part covers keys [0, end); padding them to the full length lets XLA fuse the sum into one pass.
        return sum(jnp.pad(part, ((0, 0), (0, 0), (0, length - end), (0, 0))) for end, part in parts).astype(dtype)

    d_q = jnp.concatenate(d_queries, axis=2).astype(q.dtype)
    return d_q, sum_prefixes(d_key_parts, k.dtype), sum_prefixes(d_value_parts, v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_causal_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, block_size: int) -> Array:
    """Causal self-attention: q, k, v [b, t, n, h] -> [b, t, n, h]; `segment_ids` [b, t] (None: one document per row).

    Heads are moved in front once so every score matmul is a plain batched matmul.
    """
    head_dim = q.shape[3]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * head_dim ** -0.5, k, v))
    return jnp.swapaxes(_attention(q, k, v, segment_ids, block_size), 1, 2)
