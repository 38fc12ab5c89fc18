"""Causal self-attention with the Pallas TPU splash-attention kernel, sharded with shard_map.

The kernel works on one device's [heads, length, head_dim] block, so it is mapped over the batch with vmap and over
the mesh with shard_map (batch split over data x fsdp, heads over tensor, as the logical rules do for activations).
Packed documents use the kernel's segment ids; the causal structure lets it skip the blocks above the diagonal.
`interpret=True` runs the same kernel through the Pallas interpreter (how the tests check it on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _block_sizes(length: int) -> kernel_lib.BlockSizes:
    block = min(512, length)
    return kernel_lib.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                                 block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def _local_attention(q, k, v, segment_ids, interpret: bool):
    """One shard: q, k, v [b, n, t, h], segment_ids [b, t] or None."""
    _, heads, length, _ = q.shape
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length)) for _ in range(heads)])
    kernel = kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=_block_sizes(length),
                                        interpret=interpret)
    if segment_ids is None:
        return jax.vmap(kernel)(q, k, v)
    segments = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)
    return jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_))(q, k, v, segments)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     interpret: bool = False) -> jax.Array:
    """q, k, v [b, t, n, h] -> [b, t, n, h], under the mesh set with jax.set_mesh."""
    head_dim = q.shape[-1]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * head_dim ** -0.5, k, v))  # [b, n, t, h]
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_local_attention, interpret=interpret)
    if mesh.empty:
        out = local(q, k, v, segment_ids)
    else:
        heads = P(BATCH_AXES, HEAD_AXIS, None, None)
        segments = None if segment_ids is None else P(BATCH_AXES, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, segments), out_specs=heads,
                            check_vma=False)(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)
