"""The VQ-GAN of an hf export: its weights as safetensors under the names of export/pytorch/modeling_cm3jax_vqgan.py,
that file, and a config.json whose `auto_map` lets `AutoModel.from_pretrained(folder, trust_remote_code=True)` build
it. Layouts: Flax convolutions are [h, w, in, out] (torch [out, in, h, w]), dense kernels [in, out] (torch
[out, in]); the attention's per-head kernels are flattened, its one head spanning every channel."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from cm3jax.export.params_reader import leaves
from cm3jax.export.safetensors_files import write_safetensors
from cm3jax.models.vqgan import VQGANConfig

MODELING_FILE = epath.Path(__file__).parent / "pytorch" / "modeling_cm3jax_vqgan.py"
_ATTENTION_PROJECTIONS = ("query", "key", "value")


def torch_vqgan_tensors(params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(torch name, array) of every VQ-GAN parameter (the `vqgan` params tree, without the discriminator)."""
    for path, value in leaves(params):
        value = np.asarray(value, np.float32)
        *modules, leaf = path
        if leaf == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif leaf == "kernel" and modules[-1] in _ATTENTION_PROJECTIONS:  # [in, heads, head_dim]
            value = value.reshape(value.shape[0], -1).T
        elif leaf == "kernel" and modules[-1] == "out":  # [heads, head_dim, out]
            value = value.reshape(-1, value.shape[-1]).T
        elif leaf == "bias":
            value = value.reshape(-1)
        name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        yield ".".join([*modules, name]), np.ascontiguousarray(value)


def torch_vqgan_config(model_config: VQGANConfig) -> dict:
    fields = dataclasses.asdict(model_config)
    return {
        "model_type": "cm3jax_vqgan",
        "architectures": ["CM3JaxVQGAN"],
        "auto_map": {"AutoConfig": f"{MODELING_FILE.stem}.CM3JaxVQGANConfig",
                     "AutoModel": f"{MODELING_FILE.stem}.CM3JaxVQGAN"},
        **{key: fields[key] for key in ("image_size", "channels", "num_res_blocks", "attention_at_lowest",
                                        "z_channels", "codebook_size", "code_dim")},
        "channel_multipliers": list(fields["channel_multipliers"]),
    }


def export_torch_vqgan(model_config: VQGANConfig, params: Any, out: epath.Path) -> None:
    """Writes the VQ-GAN's weights, config and PyTorch code into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = list(torch_vqgan_tensors(params))
    write_safetensors(out, [(name, value.shape, value.dtype) for name, value in tensors], tensors,
                      max_shard_bytes=1 << 62)
    (out / "config.json").write_text(json.dumps(torch_vqgan_config(model_config), indent=2))
    (out / MODELING_FILE.name).write_text(MODELING_FILE.read_text())
