"""`cm3jax export`: a trained LM (or SFT model) written for use outside its run, as
DIR/export/<model>-<step>-<format>-<dtype>.

The folder is written as `<name>.partial` and renamed when whole, so an interrupted export never leaves a folder
that looks finished. Exporting again replaces it: the earlier folder is moved aside before the new one takes its
name and removed only then, so a crash at any point keeps one whole export. Process 0 reads and writes the
parameters (hf; in the params format every process writes its shards); the other processes take part in loading the
VQ-GAN and wait.
"""
from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from cm3jax.errors import MissingInputError
from cm3jax.export import opt
from cm3jax.inference.command import model_to_use
from cm3jax.storage import replace_folder
from cm3jax.train.lm import lm_checkpoint_step
from cm3jax.workdir import Workdir

FORMATS = ("hf", "params")
DTYPES = ("float32", "bfloat16")
MODELS = ("lm", "sft")


def unexportable_because(config: ml_collections.ConfigDict) -> str | None:
    """Why config.export.format cannot hold this model (None when it can)."""
    if config.export.format == "hf":
        try:
            require_hf_expressible(config)
        except opt.UnexportableModelError as e:
            return str(e)
    return None


def require_hf_expressible(config: ml_collections.ConfigDict) -> None:
    """The LM as transformers' OPT and the VQ-GAN as the PyTorch module of export/pytorch (conv encoder and decoder
    only)."""
    opt.require_opt_expressible(config.model)
    for part in ("encoder", "decoder"):
        if config.vqgan.get(part, "conv") != "conv":
            raise opt.UnexportableModelError(
                f"config.export.format='hf': the PyTorch VQ-GAN has the conv {part}, not "
                f"vqgan.{part}={config.vqgan[part]!r}. Export it with --config.export.format=params")


def export_model(config: ml_collections.ConfigDict, workdir: Workdir) -> epath.Path:
    """Writes the export that config.export asks for; returns its folder."""
    from cm3jax.export.hf import export_hf
    from cm3jax.export.params_bundle import EXPORT_RECORD, export_params
    from cm3jax.inference.generate import GENERATING_MODELS

    e = config.export
    if e.format == "hf":
        require_hf_expressible(config)
    model = model_to_use(str(config.export.model), workdir)
    source = workdir.stage(model)
    step = lm_checkpoint_step(config, source, int(e.step), "export.model", "export.step", "export writes",
                              f"run `{GENERATING_MODELS[model]}` on this workdir first, or choose another "
                              f"--config.export.model")
    if not workdir.text_tokenizer.exists():
        raise MissingInputError(f"{workdir.text_tokenizer} not found: the export carries the run's text tokenizer "
                                f"(cm3jax tokenize)")
    out = workdir.export_folder(model, step, str(e.format), str(e.dtype))
    partial = out.parent / f"{out.name}.partial"
    if jax.process_index() == 0:
        _remove(partial)
        partial.mkdir(parents=True)
    if e.format == "hf":
        export_hf(config, workdir, model, step, partial, str(e.dtype), int(e.max_shard_mb) << 20)
    else:
        export_params(config, workdir, model, step, partial, str(e.dtype))
    if jax.process_count() > 1:  # every process's part is written before the folder is completed and renamed
        multihost_utils.sync_global_devices("cm3jax export parts written")
    if jax.process_index() == 0:
        record = {"format": str(e.format), "model": model, "step": step, "dtype": str(e.dtype),
                  "source_inputs": source.identity()}
        (partial / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        replace_folder(partial, out, keep_replaced=False)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cm3jax export written")
    return out


def _remove(path: epath.Path) -> None:
    if path.exists():
        path.rmtree()

