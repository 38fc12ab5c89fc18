"""cm3jax's VQ-GAN image tokenizer in PyTorch: images <-> grids of codebook indices, loaded from an exported folder.

    from transformers import AutoModel
    vqgan = AutoModel.from_pretrained("EXPORT/vqgan", trust_remote_code=True)
    codes = vqgan.encode(pixels)      # float [B, 3, S, S] in [-1, 1] -> int64 [B, g, g]
    pixels = vqgan.decode(codes)      # -> float [B, 3, S, S] in about [-1, 1]
    images = vqgan.to_uint8(pixels)   # -> uint8 [B, S, S, 3], for PIL.Image.fromarray

The same network as cm3jax/models/vqgan.py (taming-transformers' encoder and decoder, a factorised l2-normalised
codebook), written to need torch and transformers only. Modules carry the Flax model's names (Conv_0, ResBlock_1, ...)
so the exported tensors map one to one; convolutions pad as XLA's "SAME" does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class CM3JaxVQGANConfig(PretrainedConfig):
    model_type = "cm3jax_vqgan"

    def __init__(self, image_size: int = 256, channels: int = 128, channel_multipliers=(1, 1, 2, 4),
                 num_res_blocks: int = 2, attention_at_lowest: bool = True, z_channels: int = 256,
                 codebook_size: int = 8192, code_dim: int = 8, **kwargs):
        self.image_size, self.channels = image_size, channels
        self.channel_multipliers = list(channel_multipliers)
        self.num_res_blocks, self.attention_at_lowest = num_res_blocks, attention_at_lowest
        self.z_channels, self.codebook_size, self.code_dim = z_channels, codebook_size, code_dim
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (len(self.channel_multipliers) - 1)


class _FlaxNames:
    """Registers submodules under Flax's automatic names: Conv_0, Conv_1, ... counted per kind in creation order."""

    def __init__(self, parent: nn.Module):
        self.parent, self.counts = parent, {}

    def add(self, kind: str, module: nn.Module, name: str | None = None) -> nn.Module:
        if name is None:
            index = self.counts.get(kind, 0)
            self.counts[kind] = index + 1
            name = f"{kind}_{index}"
        self.parent.add_module(name, module)
        return module


class SameConv2d(nn.Conv2d):
    """A convolution padded as XLA's "SAME": the output is ceil(input / stride), the extra row and column at the
    end."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4 if channels >= 4 else 1), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        names = _FlaxNames(self)
        self.layers = [names.add("GroupNorm", _group_norm(in_channels)),
                       names.add("Conv", SameConv2d(in_channels, out_channels, 3)),
                       names.add("GroupNorm", _group_norm(out_channels)),
                       names.add("Conv", SameConv2d(out_channels, out_channels, 3))]
        if in_channels != out_channels:
            self.layers.append(names.add("Conv", SameConv2d(in_channels, out_channels, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, conv1, norm2, conv2, *shortcut = self.layers
        h = conv2(F.silu(norm2(conv1(F.silu(norm1(x))))))
        return (shortcut[0](x) if shortcut else x) + h


class _SelfAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(y), self.key(y), self.value(y)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(weights @ v)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        names = _FlaxNames(self)
        # Kept in a list: a module attribute would register each a second time under another name.
        self.layers = [names.add("GroupNorm", _group_norm(channels)),
                       names.add("MultiHeadDotProductAttention", _SelfAttention(channels))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, attention = self.layers
        b, c, h, w = x.shape
        y = norm(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        return x + attention(y).transpose(1, 2).reshape(b, c, h, w)


class Encoder(nn.Module):
    def __init__(self, c: CM3JaxVQGANConfig):
        super().__init__()
        names = _FlaxNames(self)
        steps = [names.add("Conv", SameConv2d(3, c.channels, 3))]
        width = c.channels
        for level, multiplier in enumerate(c.channel_multipliers):
            for _ in range(c.num_res_blocks):
                steps.append(names.add("ResBlock", ResBlock(width, c.channels * multiplier)))
                width = c.channels * multiplier
            if level < len(c.channel_multipliers) - 1:
                steps.append(names.add("Conv", SameConv2d(width, width, 3, stride=2)))
        steps.append(names.add("ResBlock", ResBlock(width, width)))
        if c.attention_at_lowest:
            steps.append(names.add("AttentionBlock", AttentionBlock(width)))
        steps.append(names.add("ResBlock", ResBlock(width, width)))
        steps += [names.add("GroupNorm", _group_norm(width)), F.silu,
                  names.add("Conv", SameConv2d(width, c.z_channels, 3)),
                  names.add("Conv", SameConv2d(c.z_channels, c.code_dim, 1), name="to_code")]
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


class _Upsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Decoder(nn.Module):
    def __init__(self, c: CM3JaxVQGANConfig):
        super().__init__()
        names = _FlaxNames(self)
        width = c.channels * c.channel_multipliers[-1]
        steps = [names.add("Conv", SameConv2d(c.code_dim, c.z_channels, 1), name="from_code"),
                 names.add("Conv", SameConv2d(c.z_channels, width, 3)),
                 names.add("ResBlock", ResBlock(width, width))]
        if c.attention_at_lowest:
            steps.append(names.add("AttentionBlock", AttentionBlock(width)))
        steps.append(names.add("ResBlock", ResBlock(width, width)))
        for level, multiplier in reversed(list(enumerate(c.channel_multipliers))):
            for _ in range(c.num_res_blocks + 1):
                steps.append(names.add("ResBlock", ResBlock(width, c.channels * multiplier)))
                width = c.channels * multiplier
            if level > 0:
                steps += [_Upsample(), names.add("Conv", SameConv2d(width, width, 3))]
        steps += [names.add("GroupNorm", _group_norm(width)), F.silu,
                  names.add("Conv", SameConv2d(width, 3, 3), name="to_image")]
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(torch.sum(x * x, dim=-1, keepdim=True) + 1e-12)


class Quantizer(nn.Module):
    def __init__(self, c: CM3JaxVQGANConfig):
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(c.codebook_size, c.code_dim))

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, g, g, D] encoder outputs -> [B, g, g] indices of the nearest codes by cosine similarity."""
        return torch.argmax(_l2_normalize(latents) @ _l2_normalize(self.codebook).T, dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return _l2_normalize(self.codebook[codes])


class CM3JaxVQGAN(PreTrainedModel):
    config_class = CM3JaxVQGANConfig
    main_input_name = "pixel_values"

    def __init__(self, config: CM3JaxVQGANConfig):
        super().__init__(config)
        self.encoder, self.quantizer, self.decoder = Encoder(config), Quantizer(config), Decoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The weights come from the exported file; nothing is initialised."""

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in [-1, 1] -> int64 codes [B, g, g]."""
        return self.quantizer.codes(self.encoder(pixel_values).permute(0, 2, 3, 1))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes [B, g, g] -> float [B, 3, S, S] (not clipped)."""
        return self.decoder(self.quantizer.lookup(codes).permute(0, 3, 1, 2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Reconstructions of `pixel_values` through the codebook."""
        return self.decode(self.encode(pixel_values))

    @staticmethod
    def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in [-1, 1] -> uint8 [B, S, S, 3] (cm3jax's rounding: truncation after clipping)."""
        return ((pixels.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)

    @staticmethod
    def from_uint8(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> float [B, 3, S, S] in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
