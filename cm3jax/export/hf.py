"""The `hf` export: a folder that transformers loads with no cm3jax installed.

    config.json, generation_config.json, model.safetensors (or shards + index)   OPTForCausalLM
    tokenizer.json, tokenizer_config.json                                         AutoTokenizer, cm3jax's ids
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.export import opt
from cm3jax.export.params_reader import ParamsReader, abstract_params, leaves
from cm3jax.export.safetensors_writer import write_safetensors
from cm3jax.export.tokenizer import save_tokenizer
from cm3jax.workdir import StageDir

def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _opt_specs(config: ml_collections.ConfigDict, dtype: np.dtype) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The planned (name, shape, dtype) of every OPT tensor, from shapes alone."""
    specs = []
    for path, leaf in leaves(abstract_params(config)):
        # Shapes only (a zero-stride view allocates nothing); a 7B model's shapes must not cost its memory.
        zeros = np.broadcast_to(np.zeros((), np.int8), leaf.shape)
        for name, value in opt.opt_tensors(path, zeros):
            specs.append((name, tuple(value.shape), dtype))
    return specs


def _opt_values(config: ml_collections.ConfigDict, reader: ParamsReader,
                dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for path, leaf in leaves(abstract_params(config)):
        for name, value in opt.opt_tensors(path, reader.read(path, leaf)):
            yield name, value.astype(dtype)


def export_hf(config: ml_collections.ConfigDict, stage_dir: StageDir, step: int, text_model: bytes, out: str,
              dtype_name: str, max_shard_bytes: int) -> list[str]:
    """Writes the LM of `stage_dir` at `step` and its tokenizer into `out`; returns the files written."""
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    model_config = opt.opt_config(config.model, vocab, dtype_name)
    dtype = numpy_dtype(dtype_name)
    os.makedirs(out, exist_ok=True)
    reader = ParamsReader(stage_dir, step)
    try:
        files = write_safetensors(out, _opt_specs(config, dtype), _opt_values(config, reader, dtype),
                                  max_shard_bytes, {"cm3jax_step": str(step)})
    finally:
        reader.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    generation = {"bos_token_id": vocab_lib.EOS, "eos_token_id": vocab_lib.EOS, "pad_token_id": vocab_lib.PAD,
                  "decoder_start_token_id": vocab_lib.EOS}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    files += ["config.json", "generation_config.json"]
    files += save_tokenizer(out, vocab, text_model)
    return files
