"""The layout of a run folder, known in one place.

    DIR/
      data/             the embedded raw dataset (`cm3jax data`)
      vqgan/            the image tokenizer's checkpoints, logs and reconstructions
      text_tokenizer/   text.model, the SentencePiece model
      tokens/           token shards ({split}-NNNNN-of-NNNNN.array_record), manifest.json, vocab.json
      retrieval/        retriever/, bank/, index/, neighbours/ (chunks), neighbours-{split}.npy
      lm/               the language model's checkpoints/, logs/
      sft/              the instruction-tuned LM's checkpoints/, logs/ (same layout as lm/)
      eval/             <model>-<step>/: metrics.json, predictions.jsonl, image sheets
      samples/          what the finished run generates
      export/           <model>-<step>-<format>-<dtype>/: the model for use outside cm3jax (docs/export.md)
      errors/           <command>-<time>-pid<N>.txt: the traceback of a command that failed unexpectedly

Every stage folder holds `config.json` (the resolved config it ran with), `COMPLETE.json` once it has finished, and
`inputs.json` where its outputs depend on another stage's (the digest later stages record, so no stage runs on,
or resumes with, inputs that changed). Paths are `etils.epath` paths, so a workdir may be a bucket.

A local workdir, a stage folder and every path a config names (USER_PATH_FIELDS) are made absolute (`~` expanded)
once, against the current directory, where they enter: no stage, library or subprocess sees a relative path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
from etils import epath

from cm3jax.config import config_to_json
from cm3jax.errors import UserError, WorkdirError
from cm3jax.storage import PathLike, absolute_path, atomic_write_text, files_digest, is_remote, unused_name

COMPLETE_MARKER = "COMPLETE.json"
INPUTS_FILE = "inputs.json"
CONFIG_FILE = "config.json"
TEXT_TOKENIZER_FILE = "text.model"

# Config fields that hold a user's local or bucket path ("" where the workdir's default applies).
USER_PATH_FIELDS = ("data.token_dir", "data.neighbours_dir", "raw_data.tfds_data_dir", "raw_data.paths",
                    "retrieval.embeddings", "train.init_from", "sft.init_from", "eval.inception_weights")


class ChangedInputsError(UserError):
    """A stage's inputs are not the ones its existing outputs were made from."""


@dataclasses.dataclass(frozen=True)
class StageDir:
    """One stage's folder: its outputs, its saved config, its completion marker and its inputs' identity."""
    path: epath.Path

    def __post_init__(self):
        object.__setattr__(self, "path", absolute_path(self.path))

    @classmethod
    def at(cls, path: StageDir | PathLike) -> StageDir:
        """The stage folder at `path` (a stage run outside a workdir, e.g. the LM on token shards elsewhere)."""
        return path if isinstance(path, StageDir) else cls(epath.Path(path))

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    @property
    def checkpoints(self) -> epath.Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> epath.Path:
        return self.path / "logs"

    @property
    def samples(self) -> epath.Path:
        return self.path / "samples"

    @property
    def checkpoints_set_aside(self) -> epath.Path:
        """Where `restore_step` moves the checkpoints after the step it resumes from."""
        return self.path / "checkpoints_set_aside"

    @property
    def config_file(self) -> epath.Path:
        return self.path / CONFIG_FILE

    def create(self) -> StageDir:
        """Creates the folder, for outputs written before the stage completes (config.json waits for
        `mark_complete`, so a refused or unfinished run leaves the last complete run's config, or none)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def prepare(self, config: ml_collections.ConfigDict) -> StageDir:
        """A training stage starting (its checks passed, its checkpoint read back): writes the config it runs with
        and drops COMPLETE.json until it completes again, so an interrupted run is never taken as complete with
        the new config (process 0)."""
        self.create()
        self.mark_incomplete()
        if jax.process_index() == 0:
            atomic_write_text(self.config_file, config_to_json(config))
        return self

    def mark_incomplete(self) -> None:
        """Drops COMPLETE.json (process 0): the stage's outputs are being redone."""
        if jax.process_index() == 0 and (self.path / COMPLETE_MARKER).exists():
            (self.path / COMPLETE_MARKER).unlink()

    def saved_config(self) -> dict | None:
        """The config this stage last ran with (None when it has not run)."""
        if not self.config_file.exists():
            return None
        return json.loads(self.config_file.read_text())

    def is_complete(self) -> bool:
        return (self.path / COMPLETE_MARKER).exists()

    def mark_complete(self, config: ml_collections.ConfigDict, summary: dict) -> None:
        """Writes the config the outputs were made with, then COMPLETE.json with `summary` (process 0)."""
        self.create()
        if jax.process_index() == 0:
            atomic_write_text(self.config_file, config_to_json(config))
            record = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
            atomic_write_text(self.path / COMPLETE_MARKER, json.dumps(record, indent=2, default=float))

    def identity(self) -> str | None:
        """What later stages record of this stage's outputs: the digest of the inputs it was made from."""
        return files_digest(self.path / INPUTS_FILE)

    def check_inputs(self, inputs: dict) -> None:
        """Raises ChangedInputsError when the folder already holds outputs made from other inputs."""
        path = self.path / INPUTS_FILE
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        changed = [f"{key}: {saved.get(key)} then, {inputs.get(key)} now" for key in sorted(set(saved) | set(inputs))
                   if saved.get(key) != inputs.get(key)]
        if changed:
            raise ChangedInputsError(f"{self} was made from other inputs than the ones in this workdir now "
                                     f"({'; '.join(changed)}); running on would mix the two. Move {self} away to "
                                     f"redo it from the current inputs")

    def record_inputs(self, inputs: dict) -> None:
        if jax.process_index() == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / INPUTS_FILE, json.dumps(inputs, indent=2, sort_keys=True))


def neighbours_file(folder: PathLike, split: str) -> epath.Path:
    """[documents, num_neighbours] train-record ids of every document of `split`, in a retrieval folder (the
    workdir's, or data.neighbours_dir)."""
    return epath.Path(folder) / f"neighbours-{split}.npy"


@dataclasses.dataclass(frozen=True)
class RetrievalDir(StageDir):
    """DIR/retrieval: the retriever's run, the memory bank's vectors, the index and the neighbour files."""

    @property
    def retriever(self) -> StageDir:
        return StageDir(self.path / "retriever")

    @property
    def bank(self) -> epath.Path:
        return self.path / "bank"

    @property
    def index(self) -> epath.Path:
        return self.path / "index"

    @property
    def neighbour_chunks(self) -> epath.Path:
        return self.path / "neighbours"

    def neighbours(self, split: str) -> epath.Path:
        return neighbours_file(self.path, split)


class Workdir:
    """Every path of a run, and the defaults of the paths a config may point elsewhere (data.token_dir,
    data.neighbours_dir)."""

    def __init__(self, root: PathLike):
        self.root = absolute_path(root)

    @classmethod
    def of(cls, value: Workdir | PathLike) -> Workdir:
        return value if isinstance(value, Workdir) else cls(value)

    def __str__(self) -> str:
        return os.fspath(self.root)

    def __repr__(self) -> str:
        return f"Workdir({str(self)!r})"

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name)

    @property
    def data(self) -> StageDir:
        return self.stage("data")

    @property
    def vqgan(self) -> StageDir:
        return self.stage("vqgan")

    @property
    def tokens(self) -> StageDir:
        return self.stage("tokens")

    @property
    def retrieval(self) -> RetrievalDir:
        return RetrievalDir(self.root / "retrieval")

    @property
    def lm(self) -> StageDir:
        return self.stage("lm")

    @property
    def sft(self) -> StageDir:
        return self.stage("sft")

    @property
    def samples(self) -> StageDir:
        return self.stage("samples")

    @property
    def export(self) -> StageDir:
        """DIR/export: one folder per export (`export_folder`)."""
        return self.stage("export")

    def export_folder(self, model: str, step: int, export_format: str, dtype: str) -> epath.Path:
        """DIR/export/<model>-<step>-<format>-<dtype>, e.g. lm-1500-hf-float32."""
        return self.export.path / f"{model}-{step}-{export_format}-{dtype}"

    @property
    def errors(self) -> epath.Path:
        """Where the command line writes the traceback of an unexpected exception (cm3jax/failure_report.py)."""
        return self.root / "errors"

    @property
    def text_tokenizer(self) -> epath.Path:
        """The SentencePiece model the tokens stage trains (or finds) and generation reads."""
        return self.root / "text_tokenizer" / TEXT_TOKENIZER_FILE

    def new_generate_folder(self, task: str) -> epath.Path:
        """A new, empty folder for one `cm3jax generate` request, samples/<task>-<time>, created here so that two
        requests never share one: a name another request took in the same second gets -2, -3, ... (on a bucket,
        where folders are only prefixes, a name under which any file exists counts as taken)."""
        stem = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.samples.path.mkdir(parents=True, exist_ok=True)
        while True:
            folder = unused_name(self.samples.path, stem)
            if is_remote(folder):
                return folder
            try:
                folder.mkdir()  # exclusive: a request that took the name meanwhile makes this one try the next
                return folder
            except FileExistsError:
                continue

    def resolve(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """A copy of config whose LM inputs default to this workdir's token shards and neighbour files, and whose
        paths (USER_PATH_FIELDS) are absolute."""
        config = config.copy_and_resolve_references()
        for field in USER_PATH_FIELDS:
            section, name = field.split(".")
            if config[section][name]:
                config[section][name] = os.fspath(absolute_path(config[section][name]))
        if not config.data.token_dir:
            config.data.token_dir = str(self.tokens)
        if not config.data.neighbours_dir:
            config.data.neighbours_dir = str(self.retrieval)
        return config

    def check(self) -> None:
        """Creates the workdir if needed and checks that a file can be written there; raises WorkdirError saying
        what is wrong."""
        root = self.root
        try:
            if root.exists() and not root.is_dir():
                raise WorkdirError(f"--workdir={self} is a file, not a folder")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WorkdirError(f"--workdir={self} cannot be created: {e.strerror or e}") from e
            probe = root / f".write-check-{os.getpid()}"
            try:
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise WorkdirError(f"--workdir={self} is not writable: {e.strerror or e}") from e
        except ImportError as e:  # fsspec's message names the missing client library
            raise WorkdirError(f"--workdir={self} needs a storage client: {e} (`pip install 'cm3jax[gcs]'` "
                               "installs the one for gs://)") from e
