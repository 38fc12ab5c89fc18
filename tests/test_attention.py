"""Attention implementations agree with a plain masked softmax reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from cm3jax.models import splash
from cm3jax.models.block_attention import block_causal_attention


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
    """Values and the custom backward pass (recomputed probabilities) against autodiff of the reference."""
    q, k, v, segments = _inputs()
    segments = segments if packed else None
    np.testing.assert_allclose(block_causal_attention(q, k, v, segments, block_size),
                               reference_attention(q, k, v, segments), atol=1e-5)
    weights = jax.random.normal(jax.random.key(7), q.shape)  # a loss whose cotangent differs per position

    def grads(attention):
        return jax.grad(lambda *qkv: (attention(*qkv) * weights).sum(), argnums=(0, 1, 2))(q, k, v)

    ours = grads(lambda *qkv: block_causal_attention(*qkv, segments, block_size))
    reference = grads(lambda *qkv: reference_attention(*qkv, segments))
    for name, got, want in zip("qkv", ours, reference):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{name}")


def test_block_causal_attention_keeps_no_probabilities_for_the_backward_pass():
    """The residuals saved for the backward pass are q, k, v, the output and one float per query row: nothing of the
    size of the score blocks (b * n * t * block floats or more)."""
    q, k, v, _ = _inputs(b=2, t=128, n=4, h=8)
    _, vjp = jax.vjp(lambda *qkv: block_causal_attention(*qkv, None, 32), q, k, v)
    saved = sum(leaf.size for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size") and leaf.ndim > 0)
    b, t, n, h = q.shape
    assert saved == 4 * b * t * n * h + b * n * t


def test_block_causal_attention_in_bfloat16_stays_close_to_float32():
    q, k, v, segments = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs())
    out = block_causal_attention(q, k, v, segments, 32)
    assert out.dtype == jnp.bfloat16
    reference = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segments)
    np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=3e-2)
    grad = jax.grad(lambda q_: block_causal_attention(q_, k, v, segments, 32).astype(jnp.float32).sum())(q)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.isfinite(grad.astype(jnp.float32)).all())


def test_splash_kernel_matches_reference_sharded_over_the_mesh():
    """The TPU kernel through the Pallas interpreter, under shard_map on the 8-device (2, 2, 2) mesh."""
    q, k, v, segments = _inputs(b=4, t=256, n=2, h=128)
    segments = jnp.concatenate([segments[1:2, :1].repeat(4, 0).repeat(100, 1), 2 * jnp.ones((4, 156), jnp.int32)], 1)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        attention = jax.jit(lambda q_, s: splash.causal_attention(q_, k, v, s, interpret=True))
        np.testing.assert_allclose(attention(q, segments), reference_attention(q, k, v, segments), atol=1e-5)
        np.testing.assert_allclose(attention(q, None), reference_attention(q, k, v, None), atol=1e-5)
