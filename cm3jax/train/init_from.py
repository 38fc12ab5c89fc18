"""The parameters a training run starts from (`sft.init_from`, `train.init_from`): a checkpoint of a stage folder
(e.g. DIR/lm), a `params` export, or an `hf` export, also one that went through PyTorch and came back
(cm3jax/export/). Each is checked against the config's vocabulary and model shape before anything trains; a float32
export comes back bit-identical."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from cm3jax.config_validation import ConfigError
from cm3jax.storage import files_digest
from cm3jax.train.checkpoint import Checkpointer, state_differences
from cm3jax.train.lm import LM_STATE_FIELDS, lm_checkpoint_step
from cm3jax.workdir import StageDir

# What fixes the shapes of an OPT model's tensors (and what its config must say for our mapping to hold).
_OPT_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                   "max_position_embeddings", "activation_function", "enable_bias", "layer_norm_elementwise_affine",
                   "tie_word_embeddings", "do_layer_norm_before", "word_embed_proj_dim")


@dataclasses.dataclass(frozen=True)
class StartingPoint:
    kind: str  # checkpoint | params | hf
    path: str
    step: int  # of the checkpoint the parameters were trained to (an hf folder made elsewhere: 0)
    identity: str | None  # recorded in inputs.json: a run resumes only from the parameters it started from

    def restore(self, abstract_params: Any, shardings: Any) -> Any:
        """The parameters laid out by `shardings`."""
        if self.kind == "params":
            from cm3jax.export.params_bundle import restore_bundle_params

            return restore_bundle_params(self.path, abstract_params, shardings)
        if self.kind == "hf":
            return _params_from_opt(self.path, abstract_params, shardings)
        checkpointer = Checkpointer(StageDir.at(self.path).checkpoints, keep=1, create=False)
        try:
            return checkpointer.restore_params(self.step, abstract_params, shardings)
        finally:
            checkpointer.close()


def starting_point(config: ml_collections.ConfigDict, path: str, step: int, source_field: str, step_field: str,
                   use: str, how_to_train: str) -> StartingPoint:
    """What `path` holds, checked: an export (its export.json says which), an OPT folder (config.json), or a stage
    folder whose checkpoint `step` (-1: the latest) is used. Errors name `source_field` / `step_field`."""
    from cm3jax.export.params_bundle import EXPORT_RECORD, read_bundle_config

    folder = epath.Path(path)
    record = json.loads((folder / EXPORT_RECORD).read_text()) if (folder / EXPORT_RECORD).exists() else {}
    if record.get("format") == "params":
        saved, _ = read_bundle_config(folder)
        _refuse_another_model(folder, state_differences(config, saved.to_dict(), LM_STATE_FIELDS), source_field, use)
        return StartingPoint("params", str(folder), int(record["step"]), files_digest(folder / EXPORT_RECORD))
    if _is_opt_folder(folder):
        _require_same_opt_shape(config, folder, source_field, use)
        return StartingPoint("hf", str(folder), int(record.get("step", 0)),
                             files_digest(folder / EXPORT_RECORD, folder / "config.json"))
    source = StageDir.at(path)
    step = lm_checkpoint_step(config, source, step, source_field, step_field, use, how_to_train)
    return StartingPoint("checkpoint", str(folder), step, source.identity())


def _is_opt_folder(folder: epath.Path) -> bool:
    config_file = folder / "config.json"
    return config_file.exists() and json.loads(config_file.read_text()).get("model_type") == "opt"


def _require_same_opt_shape(config: ml_collections.ConfigDict, folder: epath.Path, source_field: str,
                            use: str) -> None:
    from cm3jax import vocab as vocab_lib
    from cm3jax.export.opt import opt_config

    expected = opt_config(config.model, vocab_lib.UnifiedVocab.from_config(config.vocab), "float32")
    saved = json.loads((folder / "config.json").read_text())
    listed = "; ".join(f"{key}={saved.get(key)!r} there but {expected[key]!r} for this config"
                       for key in _OPT_SHAPE_KEYS if saved.get(key) != expected[key])
    _refuse_another_model(folder, listed, source_field, use)


def _refuse_another_model(folder: epath.Path, listed: str, source_field: str, use: str) -> None:
    """ConfigError naming the `listed` differences between the export in `folder` and the config (none: nothing)."""
    if listed:
        raise ConfigError(f"config.{source_field}: {folder} is another model ({listed}); {use} a model of this "
                          f"config's vocabulary and shape")


def _params_from_opt(folder: str, abstract_params: Any, shardings: Any) -> Any:
    """cm3jax parameters from OPT safetensors, one tensor at a time (export/opt.py's mapping, inverted)."""
    from cm3jax.export.opt import cm3jax_param
    from cm3jax.export.safetensors_files import SafetensorsReader

    reader = SafetensorsReader(folder)

    def place(path, abstract, sharding):
        names = tuple(getattr(key, "key", str(key)) for key in path)
        value = cm3jax_param(names, abstract.shape, reader.read)
        return jax.device_put(np.asarray(value, abstract.dtype), sharding)

    return jax.tree_util.tree_map_with_path(place, abstract_params, shardings)
