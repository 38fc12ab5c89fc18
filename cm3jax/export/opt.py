"""The CM3leon decoder as Hugging Face OPT: its `config.json` and the names and layouts of its tensors.

CM3leon's decoder is OPT's with `enable_bias=False` and `layer_norm_elementwise_affine=False` (docs/paper.md §3), so
`OPTForCausalLM` runs an exported model with no custom code. Positions: OPT's learned position table starts with two
rows it never reads (its offset of 2), written as zeros. The vocabulary is the padded one (`vocab.padded_size`) so
ids and logits line up with cm3jax's one for one. Options OPT cannot express are refused by name.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.errors import UserError

OPT_POSITION_OFFSET = 2
OPT_LAYER_NORM_EPSILON = 1e-5  # OPT's LayerNorms use torch's default; its config has no field for it
OPT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}


class UnexportableModelError(UserError, ValueError):
    """The model has an option the export format cannot express."""


def require_opt_expressible(model: ml_collections.ConfigDict) -> None:
    """Refuses, naming the field, a decoder option that OPT's architecture does not have."""
    refusals = []
    if model.activation not in OPT_ACTIVATIONS:
        refusals.append(f"model.activation={model.activation!r} (OPT has {tuple(OPT_ACTIVATIONS)})")
    if model.qk_norm:
        refusals.append("model.qk_norm=True (OPT has no QK-norm)")
    if model.get("image_grid_embedding", False):
        refusals.append("model.image_grid_embedding=True (OPT has no image-grid embedding)")
    if float(model.layer_norm_epsilon) != OPT_LAYER_NORM_EPSILON:
        refusals.append(f"model.layer_norm_epsilon={model.layer_norm_epsilon} (OPT's is fixed at 1e-5)")
    if int(model.head_dim) > 0 and int(model.head_dim) * int(model.num_heads) != int(model.d_model):
        refusals.append(f"model.head_dim={model.head_dim} (OPT's heads split d_model: head_dim = d_model / num_heads)")
    if refusals:
        raise UnexportableModelError(f"config.export.format='hf': the model cannot be written as OPT: "
                                     f"{'; '.join(refusals)}. Export it with --config.export.format=params")


def opt_config(model: ml_collections.ConfigDict, vocab: vocab_lib.UnifiedVocab, torch_dtype: str) -> dict:
    """OPTForCausalLM's config.json for this decoder and vocabulary (its own pad and eos ids, not OPT's)."""
    require_opt_expressible(model)
    d_model = int(model.d_model)
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": vocab.padded_size,
        "hidden_size": d_model,
        "word_embed_proj_dim": d_model,
        "num_hidden_layers": int(model.num_layers),
        "num_attention_heads": int(model.num_heads),
        "ffn_dim": int(model.ffn_dim) if int(model.ffn_dim) > 0 else 4 * d_model,
        "max_position_embeddings": int(model.max_seq_len),
        "activation_function": OPT_ACTIVATIONS[model.activation],
        "do_layer_norm_before": True,
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
        "tie_word_embeddings": bool(model.tie_embeddings),
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": float(model.init_std),
        "pad_token_id": vocab_lib.PAD,
        "bos_token_id": vocab_lib.EOS,
        "eos_token_id": vocab_lib.EOS,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def opt_tensors(path: tuple[str, ...], value: np.ndarray, first_layer: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """The OPT tensors (name, array in torch's [out, in] layout) of one cm3jax parameter, given by its path in the
    params tree: a stacked layer parameter gives one tensor per layer of `value` ([layers, ...], a block of the
    stack starting at `first_layer`)."""
    name = "/".join(path)
    if name == "token_embedding":
        yield "model.decoder.embed_tokens.weight", value
    elif name == "position_embedding":
        offset_rows = np.zeros((OPT_POSITION_OFFSET, value.shape[1]), value.dtype)
        yield "model.decoder.embed_positions.weight", np.concatenate([offset_rows, value])
    elif name == "lm_head":
        yield "lm_head.weight", np.ascontiguousarray(value.T)
    elif name.startswith("layers/"):
        for i, layer in enumerate(value, start=first_layer):
            yield _layer_tensor(name.removeprefix("layers/"), i, layer)
    else:
        raise KeyError(f"no OPT tensor for the parameter {name!r}")


_LAYER_NAMES = {
    "attention/query": "self_attn.q_proj.weight",
    "attention/key": "self_attn.k_proj.weight",
    "attention/value": "self_attn.v_proj.weight",
    "attention/out": "self_attn.out_proj.weight",
    "mlp/wi": "fc1.weight",
    "mlp/wo": "fc2.weight",
}


def _layer_tensor(name: str, index: int, value: np.ndarray) -> tuple[str, np.ndarray]:
    if name not in _LAYER_NAMES:
        raise KeyError(f"no OPT tensor for the layer parameter {name!r}")
    if name == "attention/out":  # [heads, head_dim, d_model] -> [d_model, heads * head_dim]
        matrix = value.reshape(-1, value.shape[-1]).T
    elif name.startswith("attention/"):  # [d_model, heads, head_dim] -> [heads * head_dim, d_model]
        matrix = value.reshape(value.shape[0], -1).T
    else:  # [in, out] -> [out, in]
        matrix = value.T
    return f"model.decoder.layers.{index}.{_LAYER_NAMES[name]}", np.ascontiguousarray(matrix)


def cm3jax_param(path: tuple[str, ...], shape: tuple[int, ...], read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The inverse of `opt_tensors`: the cm3jax parameter at `path`, of `shape`, from the OPT tensors `read(name)`
    returns."""
    name = "/".join(path)
    if name == "token_embedding":
        return read("model.decoder.embed_tokens.weight")
    if name == "position_embedding":
        return read("model.decoder.embed_positions.weight")[OPT_POSITION_OFFSET:]
    if name == "lm_head":
        return read("lm_head.weight").T
    if name.startswith("layers/") and name.removeprefix("layers/") in _LAYER_NAMES:
        layer_name = name.removeprefix("layers/")
        return np.stack([_from_layer_tensor(read(f"model.decoder.layers.{i}.{_LAYER_NAMES[layer_name]}"), shape[1:])
                         for i in range(shape[0])])
    raise KeyError(f"no OPT tensor for the parameter {name!r}")


def _from_layer_tensor(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """torch's [out, in] -> cm3jax's layout: [in, out], attention's heads axis split out ([d_model, heads, head_dim]
    for query, key and value, [heads, head_dim, d_model] for out)."""
    return np.ascontiguousarray(matrix.T.reshape(shape))
