"""The `params` export: everything `cm3jax generate` needs, without the training run (docs/export.md).

    export.json        format, model, step, dtype, the source stage's identity
    config.json        the run's config
    vocab.json, text.model
    params/            the LM's parameters alone (an orbax checkpoint; no optimizer state)
    image_tokenizer/   the VQ-GAN (ImageTokenizer.save)

`load_pretrained(folder)` gives the Generator that `cm3jax generate` uses; `sft.init_from` / `train.init_from` start
training from the parameters (cm3jax/train/init_from.py).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from cm3jax import vocab as vocab_lib
from cm3jax.config import config_to_json
from cm3jax.errors import MissingInputError
from cm3jax.export.safetensors_files import numpy_dtype
from cm3jax.storage import PathLike, absolute_path
from cm3jax.workdir import Workdir

EXPORT_RECORD = "export.json"
PARAMS_DIR = "params"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
TEXT_MODEL = "text.model"


def _lm_params_layout(config: ml_collections.ConfigDict, mesh) -> tuple[Any, Any]:
    """(abstract params, their shardings on `mesh`) of the config's LM."""
    from cm3jax.parallel.sharding import logical_axis_rules
    from cm3jax.train.lm import lm_state_init
    from cm3jax.train.loop import abstract_state_and_shardings

    abstract, shardings = abstract_state_and_shardings(lm_state_init(config)[0], mesh, logical_axis_rules(config))
    return abstract.params, shardings.params


def export_params(config: ml_collections.ConfigDict, workdir: Workdir, model: str, step: int, out: epath.Path,
                  dtype_name: str) -> None:
    """Writes the run's `model` at `step` as a params bundle in `out` (every process takes part in the orbax
    writes; process 0 writes the rest). The parameters stay sharded over the run's mesh, never whole on a host."""
    from cm3jax.parallel.mesh import create_mesh
    from cm3jax.tokenizers.image import ImageTokenizer
    from cm3jax.train.checkpoint import Checkpointer

    mesh = create_mesh(config)
    abstract, shardings = _lm_params_layout(config, mesh)
    checkpointer = Checkpointer(workdir.stage(model).checkpoints, keep=1, create=False)
    try:
        params = checkpointer.restore_params(step, abstract, shardings)
    finally:
        checkpointer.close()
    dtype = numpy_dtype(dtype_name)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    with ocp.StandardCheckpointer() as writer:
        writer.save(out / PARAMS_DIR, params)
    ImageTokenizer.load(config, workdir).save(out / IMAGE_TOKENIZER_DIR)
    if jax.process_index() == 0:
        (out / "config.json").write_text(config_to_json(config))
        vocab_lib.UnifiedVocab.from_config(config.vocab).save(out)
        (out / TEXT_MODEL).write_bytes(workdir.text_tokenizer.read_bytes())


def read_bundle_config(folder: PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """(the bundle's run config, its export record); MissingInputError when `folder` is no params export."""
    folder = epath.Path(folder)
    record_file = folder / EXPORT_RECORD
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    if record.get("format") != "params":
        raise MissingInputError(f"{folder} is not a params export: write one with `cm3jax export "
                                f"--config.export.format=params`")
    return ml_collections.ConfigDict(json.loads((folder / "config.json").read_text())), record


def restore_bundle_params(folder: PathLike, abstract_params: Any, shardings: Any) -> Any:
    """The bundle's LM parameters laid out by `shardings`, in the dtypes of `abstract_params` (a bfloat16 bundle
    is widened)."""
    _, record = read_bundle_config(folder)
    saved_dtype = numpy_dtype(record["dtype"])
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, saved_dtype, sharding=s), abstract_params,
                          shardings)
    with ocp.StandardCheckpointer() as reader:
        params = reader.restore(absolute_path(folder) / PARAMS_DIR, target)
    return jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract_params)


def load_pretrained(folder: PathLike, devices=None):
    """The Generator of `cm3jax generate` for a params export, on `devices` (default: this process's), e.g.
    `load_pretrained(folder).images("a handwritten seven", num=4, options=SamplingOptions(guidance="cfg"))`.
    Retrieval-augmented prompts need the run's memory bank and are not available from a bundle."""
    from cm3jax.config import base_config
    from cm3jax.inference.generate import Generator
    from cm3jax.models.transformer import DecoderConfig
    from cm3jax.parallel.mesh import create_mesh, data_parallel_mesh
    from cm3jax.tokenizers.image import ImageTokenizer
    from cm3jax.tokenizers.text import TextTokenizer

    folder = absolute_path(folder)
    config, record = read_bundle_config(folder)
    config.mesh = base_config().mesh  # a mesh of this host's devices, not the training run's
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    vocab_lib.require_saved_vocab(vocab, str(folder))
    devices = list(devices if devices is not None else jax.local_devices())
    mesh = create_mesh(config, devices)
    abstract, shardings = _lm_params_layout(config, mesh)
    params = restore_bundle_params(folder, abstract, shardings)
    image_tokenizer = ImageTokenizer.from_exported(folder / IMAGE_TOKENIZER_DIR, data_parallel_mesh(devices))
    return Generator(config, None, mesh, params, DecoderConfig.for_run(config, vocab), vocab,
                     TextTokenizer.load(str(folder / TEXT_MODEL)), image_tokenizer, int(record["step"]),
                     record["model"])
