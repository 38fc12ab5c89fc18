"""Generation from a trained run: the LM (latest checkpoint under DIR/lm, on the configured mesh), the VQ-GAN that
turns codes into pixels and images into codes, the text tokenizer, and optionally the memory bank for
retrieval-augmented prompts and the retriever for re-ranking.

    generator = Generator.load(config, workdir)
    images = generator.images("a handwritten seven", num=8, options=SamplingOptions(guidance="cfg", cfg_scale=3))
    caption = generator.caption(image)
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.inference.decode import GREEDY, SamplingOptions, left_pad, make_decoder
from cm3jax.inference.tasks import TaskPrompt, TaskPrompter
from cm3jax.parallel import sharding
from cm3jax.tokenizers.image import ImageTokenizer
from cm3jax.workdir import INPUTS_FILE, ChangedInputsError, StageDir, Workdir

# The stages whose checkpoints generate, and the command that trains each.
GENERATING_MODELS = {"lm": "cm3jax train", "sft": "cm3jax sft"}


class Generator:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Workdir | None, mesh, params: Any, decoder_config,
                 vocab: vocab_lib.UnifiedVocab, text, image_tokenizer: ImageTokenizer, step: int, model: str = "lm"):
        from cm3jax.parallel.sharding import logical_axis_rules

        self.config, self.workdir, self.mesh, self.params = config, workdir, mesh, params
        self.decoder_config, self.vocab, self.text, self.step = decoder_config, vocab, text, step
        self.model = model  # the stage whose parameters these are: lm or sft
        self.rules = logical_axis_rules(config)
        self.image_tokenizer = image_tokenizer
        self.image_size, self.grid = image_tokenizer.image_size, image_tokenizer.grid
        self.prompter = TaskPrompter(vocab, text.encode, self.grid)
        self._decoders: dict = {}
        self._memory = None

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: Workdir | str, devices=None,
             step: int | None = None, model: str = "lm") -> Generator:
        """The run's LM (`model`="lm") or instruction-tuned LM ("sft"), its latest checkpoint or `step`, with the
        run's tokenizers."""
        from cm3jax.parallel.mesh import create_mesh
        from cm3jax.train.lm import lm_state_init
        from cm3jax.train.loop import restore_latest_state

        workdir = Workdir.of(workdir)
        config = workdir.resolve(config)
        model_dir, command = workdir.stage(model), GENERATING_MODELS[model]
        if not model_dir.checkpoints.is_dir():
            raise MissingInputError(f"no trained model under {model_dir}: run `{command}` on this workdir first")
        vocab_lib.require_saved_vocab(vocab_lib.UnifiedVocab.from_config(config.vocab), str(model_dir))
        mesh = create_mesh(config, list(devices if devices is not None else jax.devices()))
        init_state, _, _, _ = lm_state_init(config)
        state, step = restore_latest_state(init_state, config, mesh, str(model_dir), f"`{command}`", step)
        return cls.for_params(config, workdir, mesh, state.params, step, model)

    @classmethod
    def for_params(cls, config: ml_collections.ConfigDict, workdir: Workdir, mesh, params: Any,
                   step: int, model: str = "lm") -> Generator:
        """Generation with LM parameters already on `mesh` (e.g. those a training run holds), with the run's
        tokenizers."""
        from cm3jax.models.transformer import DecoderConfig
        from cm3jax.parallel.mesh import data_parallel_mesh
        from cm3jax.tokenizers.text import TextTokenizer

        if not workdir.text_tokenizer.exists():
            raise MissingInputError(f"{workdir.text_tokenizer} not found: run `cm3jax tokenize` on this workdir first")
        # Each process turns its own codes into pixels (and back) on its own devices.
        local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        image_tokenizer = ImageTokenizer.load(config, workdir, data_parallel_mesh(local_devices))
        require_tokens_vqgan(workdir.tokens, image_tokenizer)
        vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
        return cls(config, workdir, mesh, params, DecoderConfig.for_run(config, vocab), vocab,
                   TextTokenizer.load(str(workdir.text_tokenizer)), image_tokenizer, step, model)

    def with_params(self, params: Any, step: int) -> Generator:
        """The same generator (tokenizers, compiled decoders) with other parameters of the same shapes."""
        other = copy.copy(self)
        other.params, other.step = params, step
        return other

    # -- codes and pixels ------------------------------------------------------------------------------------------

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """Any image (bytes / path / array) -> its [grid, grid] code grid."""
        return self.image_tokenizer.encode_image(image)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """[n, grid, grid] codes -> [n, size, size, 3] uint8 images."""
        return self.image_tokenizer.decode(codes)

    # -- decoding --------------------------------------------------------------------------------------------------

    def run(self, prompt: TaskPrompt, num: int, options: SamplingOptions, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`num` samples of one task prompt: (generated [num, T], lengths [num]). The prompt's first
        options.num_streams streams are decoded (one without guidance)."""
        return self.run_batch([prompt] * num, options, seed)

    def run_batch(self, prompts: list[TaskPrompt], options: SamplingOptions,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One sample of each prompt, decoded as one batch: (generated [n, T], lengths [n]). The prompts must share
        their schedule (one task)."""
        schedule = prompts[0].schedule
        for prompt in prompts:
            if len(prompt.streams) < options.num_streams:
                raise BadInputError(f"guidance {options.guidance!r} needs {options.num_streams} prompt streams, this "
                                    f"task has {len(prompt.streams)}")
            if not (np.array_equal(prompt.schedule.forced, schedule.forced)
                    and np.array_equal(prompt.schedule.modality, schedule.modality)
                    and prompt.schedule.stop_tokens == schedule.stop_tokens):
                raise ValueError("prompts decoded as one batch must share their decoding schedule")
        longest = max(len(prompt.streams[s]) for prompt in prompts for s in range(options.num_streams))
        if longest + len(schedule.forced) > self.decoder_config.max_seq_len:
            raise BadInputError(f"a prompt of {longest} tokens and {len(schedule.forced)} to generate exceed the "
                                f"model's {self.decoder_config.max_seq_len} positions (model.max_seq_len): shorten "
                                f"the prompt or retrieve fewer documents")
        key = (schedule.forced.tobytes(), schedule.modality.tobytes(), schedule.stop_tokens, options)
        if key not in self._decoders:
            self._decoders[key] = make_decoder(self.decoder_config, self.vocab, schedule, options)
        # The batch is split over the mesh's batch axes, every process and device decoding its rows; the last
        # prompt is repeated to fill the shards and its copies dropped.
        count = len(prompts)
        prompts = prompts + [prompts[-1]] * (-count % sharding.batch_shard_count(self.mesh))
        # Stream s of every prompt, then stream s + 1: stream 0 is the full condition, guidance adds the rest.
        rows = [prompt.streams[s] for s in range(options.num_streams) for prompt in prompts]
        tokens, mask = left_pad(rows)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            out, lengths = self._decoders[key](self.params, sharding.split_over_batch_axes(tokens, self.mesh),
                                               sharding.split_over_batch_axes(mask, self.mesh),
                                               jax.random.key(seed))
        return sharding.gather_rows(out)[:count], sharding.gather_rows(lengths)[:count]

    def decode_text(self, tokens: np.ndarray) -> str:
        text = tokens[self.vocab.modality(tokens) == vocab_lib.MODALITY_TEXT]
        return self.text.decode(self.vocab.text_pieces(text))

    # -- tasks -----------------------------------------------------------------------------------------------------

    def images(self, caption: str, num: int, options: SamplingOptions, seed: int = 0, retrieve: int = 0,
               candidates: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """num images for a caption: (uint8 [num, size, size, 3], codes [num, grid, grid]). `retrieve` K documents
        are prepended to the conditional prompt; with `candidates` > num, that many are drawn and the num best by
        the retriever's caption-image score are kept."""
        context = None
        if retrieve:
            from cm3jax.retrieval.memory import prepend_retrieved

            documents = self.memory().retrieve(caption, k=retrieve)
            context = prepend_retrieved(documents, np.array([vocab_lib.EOS], np.int32))
        draws = max(num, candidates)
        out, _ = self.run(self.prompter.text_to_image(caption, context), draws, options, seed)
        codes = self.vocab.image_codes(out).reshape(draws, self.grid, self.grid)
        if draws > num:
            codes = codes[np.argsort(-self.caption_image_scores(caption, codes), kind="stable")[:num]]
        return self.decode_codes(codes), codes

    @property
    def caption_style(self) -> str:
        """generate.caption_style, with auto resolved: the SFT model's instruction, the LM's CM3 infilling."""
        style = str(self.config.generate.caption_style)
        if style == "auto":
            return "instruction" if self.model == "sft" else "infill"
        return style

    def caption(self, image: Any, style: str | None = None, options: SamplingOptions | None = None,
                seed: int = 0) -> str:
        g = self.config.generate
        prompt = self.prompter.caption(self.encode_image(image), style or self.caption_style, int(g.max_text_tokens))
        out, lengths = self.run(prompt, 1, options or GREEDY, seed)
        return self.decode_text(out[0, :lengths[0]])

    def answer(self, image: Any, question: str, options: SamplingOptions | None = None, seed: int = 0) -> str:
        prompt = self.prompter.vqa(self.encode_image(image), question, int(self.config.generate.max_text_tokens))
        out, lengths = self.run(prompt, 1, options or GREEDY, seed)
        return self.decode_text(out[0, :lengths[0]])

    def infill(self, image: Any, box_pixels: tuple[int, int, int, int], options: SamplingOptions,
               caption: str | None = None, num: int = 1, seed: int = 0) -> np.ndarray:
        """Regenerates the region x0, y0, x1, y1 (pixels of the image_size x image_size image, rounded out to whole
        code cells); returns uint8 [num, size, size, 3]."""
        if self.decoder_config.image_grid_cells:
            # The prompt's codes after each <mask:i> and the spans decoded after it would be counted from their
            # span's start, not from the image's: the cells the model was trained with are not passed to decoding.
            raise BadInputError("generate infill is not supported for a model with model.image_grid_embedding (its "
                                "codes' cells are counted from each image's start, and infill cuts the image)")
        codes = self.encode_image(image)
        box = pixel_box_to_cells(box_pixels, self.image_size, self.grid)
        out, _ = self.run(self.prompter.infill(codes, box, caption), num, options, seed)
        filled = [self.prompter.fill_box(codes, box, row, self.vocab) for row in out]
        return self.decode_codes(np.stack(filled))

    def conditioned_images(self, prompt: TaskPrompt, num: int, options: SamplingOptions,
                           seed: int = 0) -> np.ndarray:
        """num images (uint8 [num, size, size, 3]) for a task prompt that asks for one image (editing, structure,
        grounding)."""
        out, _ = self.run(prompt, num, options, seed)
        return self.decode_codes(self.vocab.image_codes(out).reshape(num, self.grid, self.grid))

    def edit(self, image: Any, instruction: str, num: int, options: SamplingOptions, seed: int = 0) -> np.ndarray:
        """The image edited by the instruction, with the three-stream editing guidance."""
        options = dataclasses.replace(options, guidance="edit")
        return self.conditioned_images(self.prompter.edit(self.encode_image(image), instruction), num, options, seed)

    def structure(self, segmentation: Any, caption: str, num: int, options: SamplingOptions,
                  seed: int = 0) -> np.ndarray:
        """An image with the layout of a segmentation map (an RGB rendering, or a one-channel label map drawn in
        record_meta.LABEL_MAP_COLORS as training saw it) and the caption, with classifier-free guidance."""
        from cm3jax.data.record_meta import MetaImage, decode_meta_image
        from cm3jax.data.sources import load_image

        label_map = load_image(segmentation).mode in ("L", "P", "I", "I;16")
        condition = decode_meta_image(MetaImage(segmentation, label_map=label_map), self.image_size)
        prompt = self.prompter.structure_to_image("segmentation", self.encode_image(condition), caption)
        return self.conditioned_images(prompt, num, dataclasses.replace(options, guidance="cfg"), seed)

    def grounded(self, caption: str, objects: list[tuple[str, tuple[int, int, int, int]]], num: int,
                 options: SamplingOptions, seed: int = 0) -> np.ndarray:
        """An image of the caption with each named object in its box (x0, y0, x1, y1 pixels of the image), with
        classifier-free guidance."""
        for name, (x0, y0, x1, y1) in objects:
            if not (0 <= x0 < x1 <= self.image_size and 0 <= y0 < y1 <= self.image_size):
                raise BadInputError(f"the box of {name!r} ({x0}, {y0}, {x1}, {y1}) must satisfy 0 <= x0 < x1 <= "
                                    f"{self.image_size} and 0 <= y0 < y1 <= {self.image_size}")
        prompt = self.prompter.grounded(caption, objects)
        return self.conditioned_images(prompt, num, dataclasses.replace(options, guidance="cfg"), seed)

    # -- retrieval -------------------------------------------------------------------------------------------------

    def memory(self):
        from cm3jax.retrieval.memory import MemoryBank

        if self.workdir is None:
            raise MissingInputError("retrieval needs the run's memory bank (DIR/retrieval); a model loaded from an "
                                    "export has none: generate without retrieved documents or re-ranking")
        if self._memory is None:
            self._memory = MemoryBank.load(self.config, self.workdir)
        return self._memory

    def caption_image_scores(self, caption: str, codes: np.ndarray) -> np.ndarray:
        """The retriever's caption-image inner products for candidate code grids [n, grid, grid]."""
        from cm3jax.retrieval.neighbours import Query

        encoder = self.memory().encoder
        if encoder is None:
            raise BadInputError("re-ranking needs the trained retriever (retrieval.embeddings is set)")
        text = self.prompter.text(caption)
        vectors = encoder([Query(0, vocab_lib.MODALITY_TEXT, text, np.ones(len(text), bool))]
                          + self.image_queries(codes))
        return vectors[1:] @ vectors[0]

    def image_queries(self, codes) -> list:
        """Code grids [n, grid, grid] as the retriever's image queries."""
        from cm3jax.retrieval.neighbours import Query

        queries = []
        for grid in codes:
            ids = self.vocab.image_ids(np.asarray(grid).reshape(-1))
            queries.append(Query(0, vocab_lib.MODALITY_IMAGE, ids, np.ones(len(ids), bool)))
        return queries


def pixel_box_to_cells(box: tuple[int, int, int, int], image_size: int, grid: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels -> (row0, col0, row1, col1) code cells covering it."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        raise BadInputError(f"box {box} must satisfy 0 <= x0 < x1 <= {image_size} and 0 <= y0 < y1 <= {image_size}")
    cell = image_size / grid
    return int(y0 // cell), int(x0 // cell), int(-(-y1 // cell)), int(-(-x1 // cell))


def contact_sheet(images: np.ndarray, columns: int) -> np.ndarray:
    """[n, h, w, 3] uint8 -> one grid image with `columns` per row (white where a row is short)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return sheet


def require_tokens_vqgan(tokens: StageDir, image_tokenizer: ImageTokenizer) -> None:
    """The LM speaks the codes of the VQ-GAN its token shards were made with; decoding them with another one (e.g.
    trained further after tokenizing) would draw the wrong pictures, so that is refused."""
    path = tokens / INPUTS_FILE
    if not path.exists():
        return
    made_with = json.loads(path.read_text())
    if made_with.get("vqgan_params_sha256") != image_tokenizer.digest():
        raise ChangedInputsError(
            f"the VQ-GAN in this workdir (step {image_tokenizer.step}) is not the one {tokens} was made with (step "
            f"{made_with.get('vqgan_step')}): re-tokenize and retrain the LM, or restore that VQ-GAN checkpoint")
