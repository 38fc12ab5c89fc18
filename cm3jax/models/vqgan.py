"""The VQ-GAN image tokenizer (Flax): images <-> grids of codebook indices.

Encoder and decoder follow taming-transformers: conv stem, residual blocks (GroupNorm, swish, 3x3 convs) per
resolution with stride-2 downsampling (nearest-neighbour upsampling in the decoder), an optional self-attention block
at the lowest resolution, and a 1x1 projection to and from the code space. `vqgan.encoder=patch` replaces the encoder
by a per-patch MLP (`PatchEncoder`): each code then depends on its own f x f pixels alone, so equal patches get equal
codes anywhere in any image (the conv encoder's receptive field and GroupNorm's image-wide statistics make a code
depend on its neighbours and on the whole image, which spreads one content over many codes). `vqgan.decoder=patch`
likewise replaces the decoder by a per-patch MLP (`PatchDecoder`): each code draws its own f x f pixels alone, which
suits images whose content is aligned to the patch grid (the shapes scenes) and trains in a fraction of the conv
decoder's steps and time.
The codebook is factorised and l2-normalised (ViT-VQGAN / LlamaGen, docs/paper.md §7): the encoder output is
projected to `code_dim` (e.g. 8), both it and the codebook rows are l2-normalised, and the nearest code by cosine
similarity is chosen; this keeps a large codebook in use where plain VQ collapses. Gradients pass the quantiser
straight through. The PatchGAN discriminator is taming's NLayerDiscriminator with GroupNorm in place of BatchNorm (no
mutable batch statistics under jit/sharding).

Images are float [-1, 1], NHWC.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.config import default


def pixels_from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] images -> the float32 [-1, 1] the VQ-GAN reads."""
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def uint8_from_pixels(pixels) -> np.ndarray:
    """The VQ-GAN's float [-1, 1] output -> uint8 [0, 255] images (clipped)."""
    return np.clip((np.asarray(pixels, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    image_size: int = default("vqgan.image_size")
    channels: int = default("vqgan.channels")
    channel_multipliers: Sequence[int] = default("vqgan.channel_multipliers")
    num_res_blocks: int = default("vqgan.num_res_blocks")
    attention_at_lowest: bool = default("vqgan.attention_at_lowest")
    encoder: str = default("vqgan.encoder")
    decoder: str = default("vqgan.decoder")
    z_channels: int = default("vqgan.z_channels")
    codebook_size: int = default("vocab.image_codebook_size")
    code_dim: int = default("vqgan.code_dim")
    commitment_beta: float = default("vqgan.commitment_beta")
    disc_channels: int = default("vqgan.disc_channels")
    disc_layers: int = default("vqgan.disc_layers")

    @classmethod
    def from_config(cls, config) -> VQGANConfig:
        """From a run config: its vqgan section, with the vocabulary's codebook size (vocab.image_codebook_size)."""
        c = config.vqgan
        return cls(image_size=int(c.image_size), channels=int(c.channels),
                   channel_multipliers=tuple(int(m) for m in c.channel_multipliers),
                   num_res_blocks=int(c.num_res_blocks), attention_at_lowest=bool(c.attention_at_lowest),
                   encoder=str(c.get("encoder", "conv")),  # configs saved before the fields existed
                   decoder=str(c.get("decoder", "conv")),
                   z_channels=int(c.z_channels), codebook_size=int(config.vocab.image_codebook_size),
                   code_dim=int(c.code_dim), commitment_beta=float(c.commitment_beta),
                   disc_channels=int(c.disc_channels), disc_layers=int(c.disc_layers))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4 if channels >= 4 else 1), epsilon=1e-6)


class ResBlock(nn.Module):
    out_channels: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.out_channels, (3, 3))(nn.swish(_group_norm(x.shape[-1])(x)))
        h = nn.Conv(self.out_channels, (3, 3))(nn.swish(_group_norm(self.out_channels)(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1))(x)
        return x + h


class AttentionBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(c)(x).reshape(b, h * w, c)
        y = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=c, out_features=c)(y)
        return x + y.reshape(b, h, w, c)


class Encoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Conv(c.channels, (3, 3))(x)
        for level, multiplier in enumerate(c.channel_multipliers):
            for _ in range(c.num_res_blocks):
                x = ResBlock(c.channels * multiplier)(x)
            if level < len(c.channel_multipliers) - 1:
                x = nn.Conv(x.shape[-1], (3, 3), strides=(2, 2))(x)
        x = ResBlock(x.shape[-1])(x)
        if c.attention_at_lowest:
            x = AttentionBlock()(x)
        x = ResBlock(x.shape[-1])(x)
        x = nn.Conv(c.z_channels, (3, 3))(nn.swish(_group_norm(x.shape[-1])(x)))
        return nn.Conv(c.code_dim, (1, 1), name="to_code")(x)


def _patch_mlp_width(c: VQGANConfig) -> int:
    return c.channels * c.channel_multipliers[-1]  # the conv encoder's and decoder's lowest level


def _residual_mlp(x, width: int, blocks: int):
    for _ in range(max(1, blocks)):
        h = nn.Dense(width)(nn.swish(nn.LayerNorm()(x)))
        x = x + nn.Dense(width)(nn.swish(h))
    return nn.swish(nn.LayerNorm()(x))


class PatchEncoder(nn.Module):
    """[B, S, S, 3] -> [B, S/f, S/f, code_dim], every f x f patch on its own: flattened, then a residual MLP
    (LayerNorm per patch, swish) as wide as the conv encoder's lowest level, with num_res_blocks blocks."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        f, (b, size, _, ch) = c.downsample_factor, x.shape
        g = size // f
        x = x.reshape(b, g, f, g, f, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, g, g, f * f * ch)
        x = _residual_mlp(nn.Dense(_patch_mlp_width(c))(x), _patch_mlp_width(c), c.num_res_blocks)
        x = nn.Dense(c.z_channels)(x)
        return nn.Dense(c.code_dim, name="to_code")(x)


class PatchDecoder(nn.Module):
    """[B, g, g, code_dim] -> [B, g*f, g*f, 3], every code on its own: the mirror of PatchEncoder (a residual MLP,
    then the f x f x 3 pixels of its patch)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        f, (b, g, _, _) = c.downsample_factor, z.shape
        x = nn.Dense(c.z_channels, name="from_code")(z)
        x = _residual_mlp(nn.Dense(_patch_mlp_width(c))(x), _patch_mlp_width(c), c.num_res_blocks)
        x = nn.Dense(f * f * 3, name="to_image")(x)
        return x.reshape(b, g, g, f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * f, g * f, 3)


class Decoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, z) -> QuantizerOutput:
        c = self.config
        x = nn.Conv(c.z_channels, (1, 1), name="from_code")(z)
        x = nn.Conv(c.channels * c.channel_multipliers[-1], (3, 3))(x)
        x = ResBlock(x.shape[-1])(x)
        if c.attention_at_lowest:
            x = AttentionBlock()(x)
        x = ResBlock(x.shape[-1])(x)
        for level, multiplier in reversed(list(enumerate(c.channel_multipliers))):
            for _ in range(c.num_res_blocks + 1):
                x = ResBlock(c.channels * multiplier)(x)
            if level > 0:
                b, h, w, ch = x.shape
                x = jax.image.resize(x, (b, h * 2, w * 2, ch), "nearest")
                x = nn.Conv(ch, (3, 3))(x)
        x = nn.swish(_group_norm(x.shape[-1])(x))
        return nn.Conv(3, (3, 3), name="to_image")(x)


def _l2_normalize(x, axis=-1):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + 1e-12)


class QuantizerOutput(NamedTuple):
    quantized: jax.Array  # straight-through: forward value the code, gradient to the latent
    codes: jax.Array
    loss: jax.Array  # codebook + beta * commitment
    latents: jax.Array  # the l2-normalised encoder outputs the codes were chosen for


class VQGANOutput(NamedTuple):
    reconstructions: jax.Array
    codes: jax.Array
    quantizer_loss: jax.Array
    latents: jax.Array


class Quantizer(nn.Module):
    """Factorised, l2-normalised codebook with straight-through gradients."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, z) -> QuantizerOutput:
        c = self.config
        codebook = self.param("codebook", nn.initializers.normal(1.0), (c.codebook_size, c.code_dim))
        z = _l2_normalize(z)
        codes = jnp.argmax(jnp.einsum("...d,kd->...k", z, _l2_normalize(codebook)), axis=-1)
        quantized = self.lookup(codes)
        codebook_loss = jnp.mean(jnp.square(quantized - jax.lax.stop_gradient(z)))
        commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(quantized)))
        straight_through = z + jax.lax.stop_gradient(quantized - z)
        return QuantizerOutput(straight_through, codes, codebook_loss + c.commitment_beta * commitment_loss, z)

    def lookup(self, codes):
        codebook = self.get_variable("params", "codebook")
        return _l2_normalize(jnp.take(codebook, codes, axis=0))


class VQGAN(nn.Module):
    """__call__(images) -> VQGANOutput; encode / decode for tokenising."""

    config: VQGANConfig

    def setup(self):
        self.encoder = PatchEncoder(self.config) if self.config.encoder == "patch" else Encoder(self.config)
        self.quantizer = Quantizer(self.config)
        self.decoder = PatchDecoder(self.config) if self.config.decoder == "patch" else Decoder(self.config)

    def __call__(self, images) -> VQGANOutput:
        q = self.quantizer(self.encoder(images))
        return VQGANOutput(self.decoder(q.quantized), q.codes, q.loss, q.latents)

    def encode(self, images):
        """[B, S, S, 3] in [-1, 1] -> int32 codes [B, S/f, S/f]."""
        return self.quantizer(self.encoder(images)).codes.astype(jnp.int32)

    def decode(self, codes):
        """int32 codes [B, g, g] -> images [B, g*f, g*f, 3] (not clipped)."""
        return self.decoder(self.quantizer.lookup(codes))


class PatchDiscriminator(nn.Module):
    """Per-patch real/fake logits [B, h, w, 1]."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        x = nn.leaky_relu(nn.Conv(c.disc_channels, (4, 4), strides=(2, 2))(images), 0.2)
        for layer in range(1, c.disc_layers + 1):
            channels = c.disc_channels * min(2 ** layer, 8)
            stride = 2 if layer < c.disc_layers else 1
            x = nn.Conv(channels, (4, 4), strides=(stride, stride), use_bias=False)(x)
            x = nn.leaky_relu(_group_norm(channels)(x), 0.2)
        return nn.Conv(1, (4, 4))(x)
