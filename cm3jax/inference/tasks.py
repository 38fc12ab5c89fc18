"""Prompts for every generation task, as token streams plus the decoding schedule (docs/paper.md §5, §6).

Each builder returns a `TaskPrompt`: one prompt per guidance stream (stream 0 the full condition) and the schedule of
what is generated. Serialisation follows the training data: `<eos> segment <break> segment ...`, CM3 infilling puts
`<mask:i>` where a span was cut and asks for `<mask:i> span <eoss>` at the end (cm3jax/data/cm3.py), and the
unconditional stream replaces the prompt's text by `<mask:0>` (the paper's CFG without extra training).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data.sft import (
    CAPTION_INSTRUCTION,
    EDIT_INSTRUCTION,
    GROUNDED_INSTRUCTION,
    STRUCTURE_INSTRUCTION,
    grounded_objects_text,
)
from cm3jax.inference.decode import FREE, SAMPLE_IMAGE, Schedule

EOS, BREAK, EOSS = vocab_lib.EOS, vocab_lib.BREAK, vocab_lib.EOSS
STRUCTURE_KINDS = ("edge", "segmentation", "hed", "depth", "normal", "pose", "scribble")
CAPTION_STYLES = ("infill", "continue", "instruction")


@dataclasses.dataclass
class TaskPrompt:
    streams: list[np.ndarray]  # one token array per guidance stream; stream 0 carries the whole condition
    schedule: Schedule


def _join(*parts) -> np.ndarray:
    return np.concatenate([np.atleast_1d(np.asarray(p, np.int32)) for p in parts])


class TaskPrompter:
    """Builds prompts from captions (through the run's text tokenizer, any callable str -> piece ids) and images
    given as VQ-GAN code grids [grid, grid]."""

    def __init__(self, vocab: vocab_lib.UnifiedVocab, encode_text, grid: int):
        self.vocab, self.encode_text, self.grid = vocab, encode_text, grid

    def text(self, text: str) -> np.ndarray:
        if not text.strip():
            raise ValueError("the prompt text is empty")
        return self.vocab.text_ids(self.encode_text(text))

    def image(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.shape != (self.grid, self.grid):
            raise ValueError(f"expected a {self.grid}x{self.grid} code grid, got shape {codes.shape}")
        return self.vocab.image_ids(codes.reshape(-1))

    @property
    def masked(self) -> int:
        return self.vocab.mask_id(0)

    def text_to_image(self, caption: str, context: np.ndarray | None = None) -> TaskPrompt:
        """`<eos> caption <break>` -> a whole image span; `context` (retrieved documents, ending in <eos>) goes before
        the conditional stream only."""
        conditional = _join(EOS, self.text(caption), BREAK)
        if context is not None:
            conditional = _join(context, conditional[1:])
        return TaskPrompt([conditional, _join(EOS, self.masked, BREAK)], Schedule.image(self.grid ** 2))

    def caption(self, codes: np.ndarray, style: str = "infill", max_tokens: int = 32) -> TaskPrompt:
        """infill: `<eos> <mask:0> <break> image <mask:0>` -> caption `<eoss>` (the CM3 form of the training
        documents); continue: `<eos> image <break>` -> caption `<eos>`; instruction (SFT):
        `<eos> Describe the given picture. <mask:0> <break> image <mask:0>` -> caption `<eoss>`."""
        if style == "infill":
            return TaskPrompt([_join(EOS, self.masked, BREAK, self.image(codes), self.masked)],
                              Schedule.text(max_tokens, (EOSS, EOS)))
        if style == "continue":
            return TaskPrompt([_join(EOS, self.image(codes), BREAK)], Schedule.text(max_tokens, (EOS, BREAK)))
        if style == "instruction":
            return TaskPrompt([_join(EOS, self.text(f"{CAPTION_INSTRUCTION} "), self.masked, BREAK, self.image(codes),
                                     self.masked)], Schedule.text(max_tokens, (EOSS, EOS)))
        raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")

    def vqa(self, codes: np.ndarray, question: str, max_tokens: int = 16) -> TaskPrompt:
        """The SFT form `Question: q Answer: a. <break> image`, with the answer infilled."""
        return TaskPrompt([_join(EOS, self.text(f"Question: {question} Answer:"), self.masked, BREAK,
                                 self.image(codes), self.masked)], Schedule.text(max_tokens, (EOSS, EOS)))

    def infill(self, codes: np.ndarray, box: tuple[int, int, int, int], caption: str | None = None) -> TaskPrompt:
        """Regenerates the code cells [row0, row1) x [col0, col1) of an image: each row of the box is a CM3 span
        `<mask:i>`, asked for in order, each exactly col1 - col0 codes closed by `<eoss>`."""
        row0, col0, row1, col1 = box
        if not (0 <= row0 < row1 <= self.grid and 0 <= col0 < col1 <= self.grid):
            raise ValueError(f"box {box} is not inside the {self.grid}x{self.grid} code grid")
        if row1 - row0 > self.vocab.num_masks:
            raise ValueError(f"a box of {row1 - row0} code rows needs as many <mask:i>, but vocab.num_masks="
                             f"{self.vocab.num_masks}")
        ids = self.image(codes).reshape(self.grid, self.grid)
        body = []
        for r in range(self.grid):
            if row0 <= r < row1:
                body.append(_join(ids[r, :col0], self.vocab.mask_id(r - row0), ids[r, col1:]))
            else:
                body.append(ids[r])
        prefix = _join(EOS, self.text(caption), BREAK) if caption else _join(EOS)
        width, forced = col1 - col0, []
        for i in range(row1 - row0):
            if i:
                forced.append(self.vocab.mask_id(i))
            forced += [FREE] * width + [EOSS]
        forced = np.asarray(forced, np.int32)
        schedule = Schedule(forced, np.full(len(forced), SAMPLE_IMAGE, np.int32))
        return TaskPrompt([_join(prefix, *body, self.vocab.mask_id(0))], schedule)

    @staticmethod
    def fill_box(codes: np.ndarray, box: tuple[int, int, int, int], generated: np.ndarray,
                 vocab: vocab_lib.UnifiedVocab) -> np.ndarray:
        """The code grid with the box replaced by an infill's generated spans (their `<mask:i>` / `<eoss>` dropped)."""
        row0, col0, row1, col1 = box
        new = vocab.image_codes(generated[vocab.modality(generated) == vocab_lib.MODALITY_IMAGE])
        out = np.array(codes)
        out[row0:row1, col0:col1] = new.reshape(row1 - row0, col1 - col0)
        return out

    def edit(self, codes: np.ndarray, instruction: str) -> TaskPrompt:
        """`Edit first image following the instruction <break> image <break> instruction <break>` -> image, with three
        streams: full, image only (instruction masked), unconditional (image and instruction masked)."""
        head = _join(EOS, self.text(EDIT_INSTRUCTION), BREAK)
        full = _join(head, self.image(codes), BREAK, self.text(instruction), BREAK)
        image_only = _join(head, self.image(codes), BREAK, self.masked, BREAK)
        unconditional = _join(head, self.masked, BREAK, self.vocab.mask_id(1), BREAK)
        return TaskPrompt([full, image_only, unconditional], Schedule.image(self.grid ** 2))

    def structure_to_image(self, kind: str, condition: np.ndarray, caption: str) -> TaskPrompt:
        """`Make high quality image from {kind} features <break> condition <break> caption <break>` -> image; the
        unconditional stream masks the caption (one CFG scale, 3 in CM3leon)."""
        if kind not in STRUCTURE_KINDS:
            raise ValueError(f"structure kind {kind!r} not in {STRUCTURE_KINDS}")
        head = _join(EOS, self.text(STRUCTURE_INSTRUCTION.format(kind=kind)), BREAK, self.image(condition), BREAK)
        return TaskPrompt([_join(head, self.text(caption), BREAK), _join(head, self.masked, BREAK)],
                          Schedule.image(self.grid ** 2))

    def grounded(self, caption: str, objects: list[tuple[str, tuple[int, int, int, int]]]) -> TaskPrompt:
        """`Generate high quality image of {caption} with segmentations {name} at (x0, y0) -> (x1, y1), ... <break>`
        -> image (`objects`: name and pixel corners); the unconditional stream masks the whole instruction."""
        if not objects:
            raise ValueError("grounded generation needs at least one object and its box")
        head, tail = GROUNDED_INSTRUCTION.split("{caption}")
        placed = tail.format(objects=grounded_objects_text(objects))
        text = _join(self.text(head), self.text(caption), self.text(placed))
        return TaskPrompt([_join(EOS, text, BREAK), _join(EOS, self.masked, BREAK)], Schedule.image(self.grid ** 2))
