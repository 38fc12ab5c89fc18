"""The CM3leon decoder: an OPT-style, decoder-only transformer over the unified token stream.

Exactly as the paper describes (docs/paper.md §3): pre-LayerNorm, LayerNorm without learnable parameters, no bias
terms, no dropout, learned absolute positional embedding (truncated normal, std 0.0002), every other weight truncated
normal with std 0.006 cut at 3 sigma. "Output layers initialised to 0" is read as the two projections that write into
the residual stream in every block (attention output and FFN output): at initialisation every block is the identity,
while the LM head keeps the ordinary init so the first logits are not all equal.

Options beyond the paper: activation (relu as OPT, gelu, swiglu), tied input/output embeddings, QK-norm (Chameleon),
an image-grid embedding (DALL-E's row/column embeddings as one learned vector per cell of the VQ-GAN's code grid,
added to every image code at its cell), and the z-loss lives in the loss. Layers are stacked on a leading `layers`
axis and run with `nn.scan`, so compile time does not grow with depth; each layer is rematerialised by the configured
policy.

Packed sequences: `segment_ids` (0 = padding, 1.. = documents) stop attention across documents, and `positions`
restart at every document. Decoding: with `decode=True` the decoder keeps a KV cache in the `cache` collection
(allocated by `init` with a [batch, max_decode_len] input), and every call appends its tokens at the cache index.
Decoding runs the layers one by one, not as a scan, on per-layer parameters (`decoding_params` turns the stacked
training layout into `layers_0` .. `layers_{n-1}`), and each layer keeps its own cache, updated in place: keys
[batch, heads, head_dim, length], values [batch, heads, length, head_dim], so both attention products read the
cache as stored. (A scan over stacked parameters and caches copies every layer's weights and cache slice out of the
stack at every step, which made decoding the cm3leon_350m shape on CPU slower than transformers; docs/performance.md.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3jax.config import default
from cm3jax.models.block_attention import block_causal_attention

Array = jax.Array

STACKED_LAYERS = "layers"  # the layer scan's name: every parameter under it has a leading layer axis

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static shape and numerics of the decoder; built from `config.model` by `from_config`."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    activation: str = default("model.activation")
    tie_embeddings: bool = default("model.tie_embeddings")
    qk_norm: bool = default("model.qk_norm")
    init_std: float = default("model.init_std")
    position_init_std: float = default("model.position_init_std")
    layer_norm_epsilon: float = default("model.layer_norm_epsilon")
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attention: str = "xla"  # resolved implementation: xla | cudnn | splash
    attention_block_size: int = default("model.attention_block_size")  # query block of the XLA block-causal attention
    scan_unroll: int = default("model.scan_unroll")  # layers per iteration of the layer scan (num_layers: no loop)
    remat_policy: str = default("model.remat_policy")
    causal: bool = True  # False: bidirectional attention (the retriever's encoder towers)
    # Image-grid embedding (model.image_grid_embedding): image codes are the ids [start, end) of image_code_range, an
    # image is image_grid_cells of them in raster order; 0 cells: off.
    image_code_range: tuple[int, int] = (0, 0)
    image_grid_cells: int = 0

    @classmethod
    def from_config(cls, model_config, vocab_size: int, platform: str | None = None) -> DecoderConfig:
        """`platform` (cpu / gpu / tpu, default: jax's backend) resolves the `auto` dtype and attention choices."""
        platform = platform or jax.default_backend()
        m = model_config
        compute = m.compute_dtype
        if compute == "auto":
            compute = "float32" if platform == "cpu" else "bfloat16"
        attention = m.attention
        if attention == "auto":
            attention = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
        return cls(
            vocab_size=vocab_size,
            num_layers=m.num_layers,
            d_model=m.d_model,
            num_heads=m.num_heads,
            head_dim=m.head_dim if m.head_dim > 0 else m.d_model // m.num_heads,
            ffn_dim=m.ffn_dim if m.ffn_dim > 0 else 4 * m.d_model,
            max_seq_len=m.max_seq_len,
            activation=m.activation,
            tie_embeddings=m.tie_embeddings,
            qk_norm=m.qk_norm,
            init_std=m.init_std,
            position_init_std=m.position_init_std,
            layer_norm_epsilon=m.layer_norm_epsilon,
            param_dtype=jnp.dtype(m.param_dtype),
            compute_dtype=jnp.dtype(compute),
            attention=attention,
            attention_block_size=m.attention_block_size,
            scan_unroll=m.get("scan_unroll", 1),  # configs saved before the field existed
            remat_policy=m.remat_policy,
        )

    @classmethod
    def for_run(cls, config, vocab, platform: str | None = None) -> DecoderConfig:
        """The decoder of a run: `config.model` over `vocab` and, with model.image_grid_embedding, where the image
        codes are in the vocabulary and how many make an image (the VQ-GAN's grid)."""
        decoder = cls.from_config(config.model, vocab.padded_size, platform)
        if not config.model.get("image_grid_embedding", False):  # configs saved before the field existed
            return decoder
        from cm3jax.models.vqgan import VQGANConfig

        return dataclasses.replace(decoder, image_code_range=(vocab.image_offset, vocab.size),
                                   image_grid_cells=VQGANConfig.from_config(config).tokens_per_image)


def truncated_normal(std: float):
    # jax's truncated_normal rescales so the truncated distribution has exactly this std; cut at +-3 sigma.
    return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def logical_param(module: nn.Module, name: str, init, shape: tuple, axes: tuple) -> Array:
    cfg = module.cfg
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
    return value.astype(cfg.compute_dtype)


def _layer_norm(x: Array, epsilon: float) -> Array:
    """LayerNorm without scale or bias, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


def attention_mask(query_index: Array, key_index: Array, query_segments: Array, key_segments: Array) -> Array:
    """[batch, 1, q, k] boolean: causal by absolute index and restricted to the same packed document."""
    causal = key_index[:, None, :] <= query_index[:, :, None]
    same_document = query_segments[:, :, None] == key_segments[:, None, :]
    return (causal & same_document)[:, None]


def bidirectional_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """Every token sees every token of its segment (segment 0, padding, only sees padding): q, k, v [b, t, n, h]."""
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def causal_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, implementation: str,
                     block_size: int) -> Array:
    """Training / prefill self-attention over one sequence: q, k, v [b, t, n, h] -> [b, t, n, h]."""
    if implementation == "splash":
        from cm3jax.models import splash

        return splash.causal_attention(q, k, v, segment_ids)
    if implementation == "cudnn":
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    return block_causal_attention(q, k, v, segment_ids, block_size)


class CacheView(NamedTuple):
    """What every layer needs to read and extend its KV cache in one decoding call."""

    start: Array  # the cache index where this call's tokens go: the positions before it are filled
    length: int  # the cache's
    # [batch, 1, tokens, cache length + tokens] bool: the cached, then this call's, keys each query sees; None for a
    # prefill (the cache is empty), whose attention stays within the call
    visible: Array | None


def cached_attention(module: nn.Module, q: Array, k: Array, v: Array, segment_ids: Array, view: CacheView) -> Array:
    """This call's queries against `module`'s cache as it was and, causally, against this call's own keys, in one
    softmax (a prefill: block-causal within the call, as in training): q, k, v [b, t, n, h] -> [b, t, n, h]. The
    new keys and values are written into the cache after it is read (not during `init`, which only allocates), so
    XLA updates it in place."""
    batch, _, heads, head_dim = k.shape
    keys = module.variable("cache", "key", jnp.zeros, (batch, heads, head_dim, view.length), k.dtype)
    values = module.variable("cache", "value", jnp.zeros, (batch, heads, view.length, head_dim), v.dtype)
    f32 = jnp.float32
    if view.visible is None:  # the XLA kernel: any prompt length and dtype, on every platform
        out = block_causal_attention(q, k, v, segment_ids, module.cfg.attention_block_size)
    else:
        scores = jnp.concatenate([jnp.einsum("btnh,bnhs->bnts", q, keys.value, preferred_element_type=f32),
                                  jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=f32)], axis=-1)
        # A query always sees itself: no row is all -inf.
        weights = jax.nn.softmax(jnp.where(view.visible, scores * head_dim ** -0.5, -jnp.inf), axis=-1)
        weights = weights.astype(v.dtype)
        out = (jnp.einsum("bnts,bnsh->btnh", weights[..., :view.length], values.value, preferred_element_type=f32)
               + jnp.einsum("bnts,bsnh->btnh", weights[..., view.length:], v, preferred_element_type=f32))
    if not module.is_initializing():
        # XLA updates a loop-carried cache in place only when the write provably comes after the reads; otherwise
        # it copies the cache twice per layer and step. Adding 0 * (one output value of the row) makes the write
        # depend on the reads without changing it (a row whose output is not finite has non-finite logits anyway).
        after_reads = 0.0 * out[:, :1, :1, :1].astype(k.dtype)
        keys.value = jax.lax.dynamic_update_slice(keys.value, jnp.transpose(k + after_reads, (0, 2, 3, 1)),
                                                  (0, 0, 0, view.start))
        values.value = jax.lax.dynamic_update_slice(values.value, jnp.transpose(v + after_reads, (0, 2, 1, 3)),
                                                    (0, 0, view.start, 0))
    return out.astype(q.dtype)


class Attention(nn.Module):
    cfg: DecoderConfig
    packed: bool = False

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, cache: CacheView | None = None) -> Array:
        """cache: decode against (and extend) this layer's KV cache."""
        cfg = self.cfg
        init = truncated_normal(cfg.init_std)
        qkv_shape = (cfg.d_model, cfg.num_heads, cfg.head_dim)
        qkv_axes = ("embed", "heads", "kv")
        q = jnp.einsum("btd,dnh->btnh", x, logical_param(self, "query", init, qkv_shape, qkv_axes))
        k = jnp.einsum("btd,dnh->btnh", x, logical_param(self, "key", init, qkv_shape, qkv_axes))
        v = jnp.einsum("btd,dnh->btnh", x, logical_param(self, "value", init, qkv_shape, qkv_axes))
        head_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        q, k, v = (nn.with_logical_constraint(a, head_axes) for a in (q, k, v))
        if cfg.qk_norm:
            q = _layer_norm(q, cfg.layer_norm_epsilon)
            k = _layer_norm(k, cfg.layer_norm_epsilon)

        if cache is not None:
            out = cached_attention(self, q, k, v, segment_ids, cache)
        elif not cfg.causal:
            out = bidirectional_attention(q, k, v, segment_ids if self.packed else None)
        else:
            out = causal_attention(q, k, v, segment_ids if self.packed else None, cfg.attention,
                                   cfg.attention_block_size)
        out = nn.with_logical_constraint(out, head_axes)
        wo = logical_param(self, "out", nn.initializers.zeros, (cfg.num_heads, cfg.head_dim, cfg.d_model),
                           ("heads", "kv", "embed"))
        if cache is not None:
            # One [n * h, d] product: with two contracting axes XLA on CPU transposes the whole weight every step.
            batch, length = x.shape[:2]
            return out.reshape(batch, length, -1) @ wo.reshape(-1, cfg.d_model)
        return jnp.einsum("btnh,nhd->btd", out, wo)


class FeedForward(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        init = truncated_normal(cfg.init_std)
        mlp_axes = ("activation_batch", "activation_length", "activation_mlp")
        h = jnp.einsum("btd,df->btf", x, logical_param(self, "wi", init, (cfg.d_model, cfg.ffn_dim), ("embed", "mlp")))
        if cfg.activation == "swiglu":
            gate = jnp.einsum("btd,df->btf", x,
                              logical_param(self, "wi_gate", init, (cfg.d_model, cfg.ffn_dim), ("embed", "mlp")))
            h = nn.silu(gate) * h
        elif cfg.activation == "gelu":
            h = nn.gelu(h)
        else:
            h = nn.relu(h)
        h = nn.with_logical_constraint(h, mlp_axes)
        wo = logical_param(self, "wo", nn.initializers.zeros, (cfg.ffn_dim, cfg.d_model), ("mlp", "embed"))
        return jnp.einsum("btf,fd->btd", h, wo)


class DecoderLayer(nn.Module):
    """One pre-LN block; shaped as a scan body: (carry, broadcast inputs) -> (carry, None)."""

    cfg: DecoderConfig
    packed: bool = False

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, cache: CacheView | None = None):
        cfg = self.cfg
        embed_axes = ("activation_batch", "activation_length", "activation_embed")
        x = nn.with_logical_constraint(x, embed_axes)
        x = x + Attention(cfg, self.packed, name="attention")(_layer_norm(x, cfg.layer_norm_epsilon), segment_ids,
                                                              cache)
        x = x + FeedForward(cfg, name="mlp")(_layer_norm(x, cfg.layer_norm_epsilon))
        return nn.with_logical_constraint(x, embed_axes), None


def layer_stack(cfg: DecoderConfig, packed: bool = False) -> nn.Module:
    """The scanned, rematerialised blocks (a submodule named `layers` of the calling module) followed by the final
    LayerNorm, as a function (x [b, t, d], segment_ids [b, t]) -> x [b, t, d]."""
    layer = DecoderLayer
    if cfg.remat_policy != "none":
        layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=cfg.num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, packed, name=STACKED_LAYERS)

    def apply(x: Array, segment_ids: Array) -> Array:
        x, _ = layers(x, segment_ids)
        return _layer_norm(x, cfg.layer_norm_epsilon)

    return apply


def decoding_layer_name(layer: int) -> str:
    return f"{STACKED_LAYERS}_{layer}"


def decoding_params(params: dict, num_layers: int) -> dict:
    """The decoder's parameters as `CM3LeonDecoder(decode=True)` reads them: the stacked `layers` subtree split into
    one subtree per layer (a copy of the layer parameters). Parameters already split are returned as they are."""
    if STACKED_LAYERS not in params:
        return params
    split = {decoding_layer_name(i): jax.tree.map(lambda stacked, i=i: stacked[i], params[STACKED_LAYERS])
             for i in range(num_layers)}
    return {**{name: value for name, value in params.items() if name != STACKED_LAYERS}, **split}


class CM3LeonDecoder(nn.Module):
    """tokens [batch, length] -> logits [batch, length, vocab_size] (float32). With `decode=True` the parameters
    are in the decoding layout (`decoding_params`)."""

    cfg: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 prefill: bool = False, image_cells: Array | None = None) -> Array:
        """prefill (decoding): the cache is empty, so attention stays within this call. image_cells (with
        cfg.image_grid_cells): each image code's raster index in its image, as the data pipeline gives it through
        CM3's reordering; without it the codes are counted from each image's start (`image_grid_index`)."""
        cfg = self.cfg
        batch, length = tokens.shape
        packed = segment_ids is not None
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        cache = self._extend_cache(segment_ids, prefill) if self.decode else None
        if positions is None:
            start = cache.start if self.decode else 0
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))

        init = truncated_normal(cfg.init_std)
        embedding = self.param("token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
        position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(truncated_normal(cfg.position_init_std), ("position", "embed")),
            (cfg.max_seq_len, cfg.d_model), cfg.param_dtype)
        x = jnp.take(embedding, tokens, axis=0) + jnp.take(position_embedding, positions, axis=0)
        if cfg.image_grid_cells:
            x = x + self._image_grid_embedding(tokens, prefill, image_cells)
        x = x.astype(cfg.compute_dtype)

        if self.decode:
            for layer in range(cfg.num_layers):
                x, _ = DecoderLayer(cfg, packed, name=decoding_layer_name(layer))(x, segment_ids, cache)
            x = _layer_norm(x, cfg.layer_norm_epsilon)
        else:
            x = layer_stack(cfg, packed)(x, segment_ids)

        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(cfg.compute_dtype))
        else:
            head = logical_param(self, "lm_head", init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
            logits = jnp.einsum("btd,dv->btv", x, head)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def _image_grid_embedding(self, tokens: Array, prefill: bool, image_cells: Array | None) -> Array:
        """[batch, length, d_model]: each image code's cell embedding, zero elsewhere. Decoding counts the cells and
        carries the length of the image run the cache ends in (`image_run`), so a code decoded alone still knows its
        cell."""
        cfg = self.cfg
        table = self.param("image_grid_embedding",
                           nn.with_logical_partitioning(truncated_normal(cfg.init_std), ("position", "embed")),
                           (cfg.image_grid_cells, cfg.d_model), cfg.param_dtype)
        start, end = cfg.image_code_range
        is_image = (tokens >= start) & (tokens < end)
        run_before = jnp.zeros(tokens.shape[:1], jnp.int32)
        if self.decode:
            run = self.variable("cache", "image_run", jnp.zeros, tokens.shape[:1], jnp.int32)
            run_before = run_before if prefill else run.value
        index = image_grid_index(is_image, run_before) if image_cells is None else image_cells
        if self.decode and not self.is_initializing():
            run.value = jnp.where(is_image[:, -1], index[:, -1] + 1, 0)
        cells = jnp.take(table, index % cfg.image_grid_cells, axis=0)
        return jnp.where(is_image[..., None], cells, 0).astype(table.dtype)

    def _extend_cache(self, segment_ids: Array, prefill: bool) -> CacheView:
        """Records this call's segments in the cache and moves its index past them (not during `init`, which only
        allocates: the cache's length is `init`'s input length); -> what the layers need to attend: the filled
        cache positions and this call's tokens up to the query, within the query's document."""
        batch, length = segment_ids.shape
        segments = self.variable("cache", "segment_ids", jnp.zeros, (batch, length), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start, cached_segments = index.value, segments.value
        cache_length = cached_segments.shape[1]
        visible = None
        if not prefill:
            filled = jnp.arange(cache_length) < start
            cache_visible = filled[None, None, :] & (segment_ids[:, :, None] == cached_segments[:, None, :])
            query_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            own_visible = attention_mask(query_index, query_index, segment_ids, segment_ids)
            visible = jnp.concatenate([cache_visible[:, None], own_visible], axis=-1)
        if not self.is_initializing():
            segments.value = jax.lax.dynamic_update_slice(cached_segments, segment_ids.astype(jnp.int32), (0, start))
            index.value = start + length
        return CacheView(start, cache_length, visible)


def image_grid_index(is_image: Array, run_before: Array) -> Array:
    """[batch, length] bool, [batch] int -> int32 [batch, length]: how many image codes come right before each one in
    its run of consecutive codes (its raster index in its image), counting `run_before` codes that precede the
    first token. Every image sits between non-image tokens (`<break>`), so the count restarts at each image. A CM3
    span cut out of an image restarts it too, which is why training takes the cells from the data pipeline
    (`cm3.MaskedDocument.image_cells`); decoding prompts hold whole images (`generate infill`, which cuts one, is
    refused for a model with the image-grid embedding)."""
    length = is_image.shape[1]
    steps = jnp.arange(length, dtype=jnp.int32)[None, :]
    last_other = jnp.where(is_image, -1 - run_before[:, None], steps)
    last_other = jax.lax.cummax(last_other, axis=1)
    return steps - last_other - 1


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B formula.

    6 * (matmul parameters: attention, FFN, LM head) + 12 * layers * seq_len * num_heads * head_dim for attention
    scores and values (counted over the full square, as PaLM and MaxText do). Embedding lookups are not matmuls and
    rematerialisation is not counted (MFU measures useful work).
    """
    attention_params = 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
    ffn_params = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.ffn_dim
    matmul_params = cfg.num_layers * (attention_params + ffn_params) + cfg.d_model * cfg.vocab_size
    attention_flops = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return float(6 * matmul_params + attention_flops)

