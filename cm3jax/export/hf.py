"""The `hf` export: a folder that transformers loads with no cm3jax installed (docs/export.md).

    config.json, generation_config.json, model.safetensors (or shards + index)   OPTForCausalLM
    tokenizer.json, tokenizer_config.json                                         AutoTokenizer, cm3jax's ids
    vqgan/                                                                        AutoModel, trust_remote_code
    README.md (the model card and its PyTorch example), cm3jax_config.json
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from cm3jax import vocab as vocab_lib
from cm3jax.config import config_to_json
from cm3jax.export import opt
from cm3jax.export.model_card import model_card
from cm3jax.export.params_reader import ParamsReader, abstract_params, is_stacked_layers, leaves
from cm3jax.export.safetensors_files import numpy_dtype, write_safetensors
from cm3jax.export.tokenizer import save_tokenizer
from cm3jax.export.vqgan import export_torch_vqgan
from cm3jax.workdir import Workdir

TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def opt_specs(config: ml_collections.ConfigDict, dtype: np.dtype) -> list[TensorSpec]:
    """The planned (name, shape, dtype) of every OPT tensor, from shapes alone."""
    specs = []
    for path, leaf in leaves(abstract_params(config)):
        # Shapes only (a zero-stride view allocates nothing): a 7B model's plan must not cost its memory.
        zeros = np.broadcast_to(np.zeros((), np.int8), leaf.shape)
        specs += [(name, tuple(value.shape), dtype) for name, value in opt.opt_tensors(path, zeros)]
    return specs


def _opt_values(config: ml_collections.ConfigDict, reader: ParamsReader,
                dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for path, leaf in leaves(abstract_params(config)):
        if is_stacked_layers(path):
            blocks = reader.read_layer_blocks(path, leaf)
        else:
            blocks = [(0, reader.read(path, leaf))]
        for first_layer, block in blocks:
            for name, value in opt.opt_tensors(path, block, first_layer):
                yield name, value.astype(dtype, copy=False)


def generation_config() -> dict:
    """transformers' generation defaults for the unified vocabulary: a sequence ends at <eos>, rows pad with <pad>."""
    return {"bos_token_id": vocab_lib.EOS, "eos_token_id": vocab_lib.EOS, "pad_token_id": vocab_lib.PAD,
            "decoder_start_token_id": vocab_lib.EOS}


def export_hf(config: ml_collections.ConfigDict, workdir: Workdir, model: str, step: int, out: epath.Path,
              dtype_name: str, max_shard_bytes: int) -> None:
    """Writes the run's `model` (lm or sft) at `step`, its tokenizer, its VQ-GAN and a model card into `out`
    (process 0; the others only take part in loading the VQ-GAN)."""
    from cm3jax.tokenizers.image import ImageTokenizer

    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    model_config = opt.opt_config(config.model, vocab, dtype_name)
    dtype = numpy_dtype(dtype_name)
    image_tokenizer = ImageTokenizer.load(config, workdir)
    if jax.process_index() != 0:
        return
    export_torch_vqgan(image_tokenizer.model_config, jax.device_get(image_tokenizer.params), out / "vqgan")
    del image_tokenizer  # its memory is free for the LM's tensors
    values = _opt_values(config, ParamsReader(workdir.stage(model), step), dtype)
    write_safetensors(out, opt_specs(config, dtype), values, max_shard_bytes, {"cm3jax_step": str(step)})
    (out / "config.json").write_text(json.dumps(model_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(), indent=2))
    save_tokenizer(out, vocab, workdir.text_tokenizer.read_bytes())
    (out / "cm3jax_config.json").write_text(config_to_json(config))
    metrics_file = workdir.stage("eval").path / f"{model}-{step}" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    (out / "README.md").write_text(model_card(config, model, step, metrics))
