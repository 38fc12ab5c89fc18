"""The dual-encoder retriever: a text tower over a document's SentencePiece pieces and an image tower over its VQ-GAN
codes, each a bidirectional transformer (the decoder's blocks with `causal=False`), mean-pooled over the tokens it
reads and projected to `embed_dim`, l2-normalised. Trained with a symmetric InfoNCE loss at a learned temperature
(CLIP), so inner products of the two towers' outputs rank matching text and images first (docs/paper.md §4).

Tower inputs are tower-local ids (text piece / code numbers, not unified ids) with a mask of the tokens to read:
padding and dropped query tokens are masked out while every kept token keeps its position.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.models.transformer import DecoderConfig, layer_stack, logical_param, truncated_normal
from cm3jax.models.vqgan import VQGANConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    text_tower: DecoderConfig  # vocab_size: text pieces; max_seq_len: text tokens read per document
    image_tower: DecoderConfig  # vocab_size: codebook size; max_seq_len: codes per image
    embed_dim: int
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, platform: str | None = None) -> RetrieverConfig:
        """From config.retriever, with the vocabulary's sizes and the VQ-GAN's code grid."""
        r = config.retriever
        vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
        image_tokens = VQGANConfig.from_config(config).tokens_per_image
        platform = platform or jax.default_backend()
        compute = r.compute_dtype if r.compute_dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")

        def tower(vocab_size: int, length: int) -> DecoderConfig:
            return DecoderConfig(vocab_size=vocab_size, num_layers=int(r.num_layers), d_model=int(r.d_model),
                                 num_heads=int(r.num_heads), head_dim=int(r.d_model) // int(r.num_heads),
                                 ffn_dim=4 * int(r.d_model), max_seq_len=length, activation="gelu",
                                 init_std=float(r.init_std), position_init_std=float(r.init_std),
                                 compute_dtype=jnp.dtype(compute), remat_policy="none", causal=False)

        return cls(text_tower=tower(vocab.text_size, int(r.text_len)),
                   image_tower=tower(vocab.image_codebook_size, image_tokens), embed_dim=int(r.embed_dim),
                   temperature_init=float(r.temperature_init), max_logit_scale=float(r.max_logit_scale))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TokenTower(nn.Module):
    """(tokens [b, t] tower-local ids, mask [b, t] bool) -> [b, embed_dim] unit vectors (zero for an empty mask)."""

    cfg: DecoderConfig
    embed_dim: int

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        cfg = self.cfg
        length = tokens.shape[1]
        init = truncated_normal(cfg.init_std)
        embedding = self.param("token_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
        positions = self.param("position_embedding", nn.with_logical_partitioning(init, ("position", "embed")),
                               (cfg.max_seq_len, cfg.d_model), cfg.param_dtype)
        x = (jnp.take(embedding, tokens, axis=0) + positions[None, :length]).astype(cfg.compute_dtype)
        # Segment 1 for tokens read, 0 for the rest: masked tokens never reach the ones that are read.
        x = layer_stack(cfg, packed=True)(x, mask.astype(jnp.int32))
        weights = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        projection = logical_param(self, "projection", init, (cfg.d_model, self.embed_dim), ("embed", None))
        return l2_normalize(pooled @ projection.astype(jnp.float32))


class DualEncoder(nn.Module):
    """Text and image towers and the learned logit scale (1 / temperature, kept in log space)."""

    cfg: RetrieverConfig

    def setup(self):
        self.text_tower = TokenTower(self.cfg.text_tower, self.cfg.embed_dim)
        self.image_tower = TokenTower(self.cfg.image_tower, self.cfg.embed_dim)
        init = nn.initializers.constant(math.log(1.0 / self.cfg.temperature_init))
        self.log_logit_scale = self.param("logit_scale", nn.with_logical_partitioning(init, ()), (), jnp.float32)

    def embed_text(self, tokens: Array, mask: Array) -> Array:
        return self.text_tower(tokens, mask)

    def embed_image(self, tokens: Array, mask: Array) -> Array:
        return self.image_tower(tokens, mask)

    def logit_scale(self) -> Array:
        """exp of the learned parameter, capped at max_logit_scale (CLIP: 100) for stability."""
        return jnp.minimum(jnp.exp(self.log_logit_scale), self.cfg.max_logit_scale)

    def __call__(self, text: Array, text_mask: Array, image: Array, image_mask: Array) -> tuple[Array, Array, Array]:
        return self.embed_text(text, text_mask), self.embed_image(image, image_mask), self.logit_scale()


def tower_input(ids: np.ndarray, keep: np.ndarray | None, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tower-local ids -> (tokens [length] int32, mask [length] bool): cut to `length`, zero-padded; `keep` (default:
    all) marks the tokens the tower reads."""
    ids = np.asarray(ids, np.int32)[:length]
    mask = np.ones(len(ids), bool) if keep is None else np.asarray(keep, bool)[:length]
    tokens, read = np.zeros(length, np.int32), np.zeros(length, bool)
    tokens[:len(ids)], read[:len(ids)] = ids, mask
    return tokens, read
