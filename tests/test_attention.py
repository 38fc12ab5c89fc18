"""Attention implementations agree with a plain masked softmax reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from cm3jax.models import splash
from cm3jax.models.transformer import block_causal_attention


def reference_attention(q, k, v, segment_ids):
    length = q.shape[1]
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def _inputs(b=2, t=96, n=4, h=16):
    q, k, v = (jax.random.normal(key, (b, t, n, h)) for key in jax.random.split(jax.random.key(0), 3))
    segments = jnp.array([[1] * 40 + [2] * 50 + [0] * 6, [1] * 96])[:b]
    return q, k, v, segments


@pytest.mark.parametrize("block_size", [32, 40, 96, 128])  # dividing, not dividing, one block, larger than t
@pytest.mark.parametrize("packed", [False, True])
def test_block_causal_attention_matches_reference(block_size, packed):
    q, k, v, segments = _inputs()
    segments = segments if packed else None
    np.testing.assert_allclose(block_causal_attention(q, k, v, segments, block_size),
                               reference_attention(q, k, v, segments), atol=1e-5)
    grad = jax.grad(lambda q_: (block_causal_attention(q_, k, v, segments, block_size) ** 2).sum())(q)
    grad_ref = jax.grad(lambda q_: (reference_attention(q_, k, v, segments) ** 2).sum())(q)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-4)


def test_splash_kernel_matches_reference_sharded_over_the_mesh():
    """The TPU kernel through the Pallas interpreter, under shard_map on the 8-device (2, 2, 2) mesh."""
    q, k, v, segments = _inputs(b=4, t=256, n=2, h=128)
    segments = jnp.concatenate([segments[1:2, :1].repeat(4, 0).repeat(100, 1), 2 * jnp.ones((4, 156), jnp.int32)], 1)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        attention = jax.jit(lambda q_, s: splash.causal_attention(q_, k, v, s, interpret=True))
        np.testing.assert_allclose(attention(q, segments), reference_attention(q, k, v, segments), atol=1e-5)
        np.testing.assert_allclose(attention(q, None), reference_attention(q, k, v, None), atol=1e-5)
