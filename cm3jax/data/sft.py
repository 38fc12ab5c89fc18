"""Instruction-tuning (SFT) examples: CM3leon's task templates (docs/paper.md §6, its Table 5) built from a token-shard
record and the fields its source kept (data/record_meta.py).

A `TaskExample` is a document (segments, serialised as in pretraining) and its targets, the tokens the instruction
asks for. Where the template puts the targets after their condition (text -> image, editing, structure, grounding,
image-first captioning and VQA) they are learnt in place. Where the template puts them before it (`Question: q
Answer: a. <break> image`), each target is a CM3 span: `<mask:i>` in its place and `<mask:i> target <eoss>` after the
document. That is the prompt the eval and generate commands give (inference/tasks.py), so an answer is always
predicted after its whole condition.

Tasks, and the fields a record needs for each:
- text_to_image: its caption and image (every record): `caption <break> image`;
- caption: `Describe the given picture. caption <break> image`, or the image first;
- vqa: meta `vqa` (question and answer lists), or a class `label` with names (digits: "what digit is this?"):
  `Question: q Answer: a. <break> image`, or the image first; with sft.vqa_pairs > 1 an example may ask several of
  the record's questions (`Question: q1 Answer: a1.Question: q2 Answer: a2. <break> image`), each answer a target;
- edit: meta `edit` (instruction, edited image): `Edit first image following the instruction <break> image <break>
  instruction <break> edited image`;
- structure: meta `segmentation` (a label map, stored as image codes): `Make high quality image from segmentation
  features <break> map <break> caption <break> image`;
- grounded: meta `objects` (kind, color, bbox): `Generate high quality image of caption with segmentations red circle
  at (x0, y0) -> (x1, y1), ... <break> image`, corners in pixels of the image.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.config import default
from cm3jax.data import cm3
from cm3jax.data.cm3 import Span
from cm3jax.data.documents import (
    Document,
    Segment,
    decode_document_record,
    image_segment,
    serialized_length,
    text_segment,
)
from cm3jax.data.pipeline import COUNTER_KEYS, PipelineOptions
from cm3jax.data.record_meta import meta_image_ids

TASKS = ("text_to_image", "caption", "vqa", "edit", "structure", "grounded")
# The tasks decoded with guidance (inference/tasks.py): their unconditional streams mask part of the condition.
GUIDED_TASKS = ("text_to_image", "edit", "structure", "grounded")
LOSS_ON = ("all", "target")

CAPTION_INSTRUCTION = "Describe the given picture."
EDIT_INSTRUCTION = "Edit first image following the instruction"
STRUCTURE_INSTRUCTION = "Make high quality image from {kind} features"
GROUNDED_INSTRUCTION = "Generate high quality image of {caption} with segmentations {objects}"
LABEL_QUESTION = "what digit is this?"
# The instructions' own words, which the text tokenizer learns besides the captions (stages/tokens.py).
TEMPLATE_TEXTS = (CAPTION_INSTRUCTION, EDIT_INSTRUCTION, STRUCTURE_INSTRUCTION.format(kind="segmentation"),
                  f"Question: {LABEL_QUESTION} Answer:", "Generate high quality image of",
                  "with segmentations at (0, 1) -> (2, 3), (4, 5) -> (6, 7), (8, 9)")

TextEncoder = Callable[[str], np.ndarray]  # text -> unified text ids


@dataclasses.dataclass(frozen=True)
class TaskExample:
    task: str
    document: Document
    targets: tuple[Span, ...]  # the tokens the instruction asks for, in document order, all in one segment

    @property
    def infilled(self) -> bool:
        """True when the targets come before the document's last segment (their condition): each is then learnt as
        a CM3 span."""
        return self.targets[0].segment != len(self.document) - 1

    @property
    def infilled_spans(self) -> int:
        return len(self.targets) if self.infilled else 0


@dataclasses.dataclass(frozen=True)
class Record:
    """What the templates read from one token-shard record."""
    caption: np.ndarray  # unified text ids
    image: np.ndarray  # unified image ids
    meta: Mapping


def record_of(document: Document, meta: Mapping) -> Record | None:
    """The caption and image of a caption-image document (None for other documents)."""
    texts = [s.tokens for s in document if s.modality == vocab_lib.MODALITY_TEXT]
    images = [s.tokens for s in document if s.modality == vocab_lib.MODALITY_IMAGE]
    return Record(texts[0], images[0], meta) if texts and images else None


def grounded_objects_text(objects: Sequence[tuple[str, Sequence[int]]]) -> str:
    """[(name, (x0, y0, x1, y1)), ...] -> "red circle at (x0, y0) -> (x1, y1), ..." (the paper's discrete
    coordinates)."""
    return ", ".join(f"{name} at ({x0}, {y0}) -> ({x1}, {y1})" for name, (x0, y0, x1, y1) in objects)


def record_boxes(meta: Mapping, image_size: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """A record's objects as (colour kind, (x0, y0, x1, y1) in pixels), from meta `objects` (bbox: ymin, xmin,
    ymax, xmax as fractions)."""
    objects = meta["objects"]
    boxes = []
    for color, kind, (ymin, xmin, ymax, xmax) in zip(objects["color"], objects["kind"], objects["bbox"]):
        corners = tuple(int(round(v * image_size)) for v in (xmin, ymin, xmax, ymax))
        boxes.append((f"{color} {kind}", corners))
    return boxes


class TaskTemplates:
    """Builds each task's TaskExample from a record; `available(record)` says which tasks its fields allow."""

    def __init__(self, encode_text: TextEncoder, image_size: int, label_names: Sequence[str] | None = None,
                 vqa_pairs: int = 1):
        self.encode_text, self.image_size, self.label_names = encode_text, image_size, label_names
        self.vqa_pairs = vqa_pairs

    def available(self, record: Record) -> list[str]:
        meta = record.meta
        has = {"text_to_image": True, "caption": True,
               "vqa": bool(meta.get("vqa", {}).get("question")) or (self.label_names is not None and "label" in meta),
               "edit": "edit" in meta, "structure": "segmentation" in meta,
               "grounded": bool(meta.get("objects", {}).get("bbox"))}
        return [task for task in TASKS if has[task]]

    def build(self, task: str, record: Record, rng: np.random.Generator, image_first: bool) -> TaskExample:
        if task == "text_to_image":
            return _last_is_target(task, [text_segment(record.caption), image_segment(record.image)])
        if task == "caption":
            return self._text_answers(task, record.image, [(self.encode_text(f"{CAPTION_INSTRUCTION} "),
                                                            record.caption)], image_first)
        if task == "vqa":
            pairs = [(self.encode_text(f"Question: {question} Answer:"), self.encode_text(f" {answer}."))
                     for question, answer in self._questions(record.meta, rng)]
            return self._text_answers(task, record.image, pairs, image_first)
        if task == "edit":
            edit = record.meta["edit"]
            return _last_is_target(task, [text_segment(self.encode_text(EDIT_INSTRUCTION)),
                                          image_segment(record.image),
                                          text_segment(self.encode_text(edit["instruction"])),
                                          image_segment(meta_image_ids(edit["image"]))])
        if task == "structure":
            return _last_is_target(task, [
                text_segment(self.encode_text(STRUCTURE_INSTRUCTION.format(kind="segmentation"))),
                image_segment(meta_image_ids(record.meta["segmentation"])), text_segment(record.caption),
                image_segment(record.image)])
        if task == "grounded":
            return _last_is_target(task, [text_segment(self.grounded_prompt(record)), image_segment(record.image)])
        raise ValueError(f"SFT task {task!r} not in {TASKS}")

    def grounded_prompt(self, record: Record) -> np.ndarray:
        """The grounded instruction's ids: the record's caption ids spliced in, so its pieces are the caption's."""
        head, tail = GROUNDED_INSTRUCTION.split("{caption}")
        objects = tail.format(objects=grounded_objects_text(record_boxes(record.meta, self.image_size)))
        return np.concatenate([self.encode_text(head), record.caption, self.encode_text(objects)]).astype(np.int32)

    def _questions(self, meta: Mapping, rng: np.random.Generator) -> list[tuple[str, str]]:
        """Up to `vqa_pairs` of the record's question-answer pairs (how many aimed for drawn uniformly from 1), in
        random order, leaving out any whose answer another of them states (`where is the red circle? top left` and
        `what color is the circle in the top left? red` answer each other: asked together, the text would give the
        answer the image should)."""
        pairs = meta.get("vqa", {})
        if not pairs.get("question"):
            return [(LABEL_QUESTION, self.label_names[int(meta["label"])])]
        available = list(zip(pairs["question"], pairs["answer"]))
        if self.vqa_pairs == 1:
            return [available[int(rng.integers(len(available)))]]
        count = int(rng.integers(1, min(self.vqa_pairs, len(available)) + 1))
        chosen: list[tuple[str, str]] = []
        for i in rng.permutation(len(available)):
            if len(chosen) == count:
                break
            question, answer = available[i]
            if not any(_states(q, answer) or _states(question, a) for q, a in chosen):
                chosen.append((question, answer))
        return chosen

    def _text_answers(self, task: str, image: np.ndarray, pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                      image_first: bool) -> TaskExample:
        """`instruction answer ... <break> image` (each answer a CM3 span) or `image <break> instruction answer ...`
        from (instruction, answer) ids."""
        pieces, spans, cursor = [], [], 0
        segment = 1 if image_first else 0
        for head, answer in pairs:
            pieces += [head, answer]
            spans.append(Span(segment, cursor + len(head), cursor + len(head) + len(answer)))
            cursor += len(head) + len(answer)
        text = text_segment(np.concatenate(pieces))
        document = [image_segment(image), text] if image_first else [text, image_segment(image)]
        return TaskExample(task, document, tuple(spans))


def _states(question: str, answer: str) -> bool:
    """Whether `answer` appears in `question` as whole words (an empty answer states nothing)."""
    answer = answer.strip()
    return bool(answer) and re.search(rf"\b{re.escape(answer)}\b", question, re.IGNORECASE) is not None


def _last_is_target(task: str, document: Document) -> TaskExample:
    last = len(document) - 1
    return TaskExample(task, document, (Span(last, 0, len(document[last].tokens)),))


def guidance_stream_forms(example: TaskExample, vocab: vocab_lib.UnifiedVocab) -> list[TaskExample]:
    """The example as each of its task's guidance streams decodes it (TaskPrompter's non-full streams), the target
    kept: text -> image and grounded `<mask:0> <break> image`; structure with the caption masked; edit with the
    instruction masked, and with image and instruction masked. An empty list for unguided tasks."""
    masked = [text_segment(np.array([vocab.mask_id(i)], np.int32)) for i in range(1 + (example.task == "edit"))]
    document = example.document
    if example.task in ("text_to_image", "grounded"):
        forms = [[masked[0], document[-1]]]
    elif example.task == "structure":
        forms = [[*document[:2], masked[0], document[3]]]
    elif example.task == "edit":
        forms = [[*document[:2], masked[0], document[3]], [document[0], masked[0], masked[1], document[3]]]
    else:
        return []
    return [_last_is_target(example.task, form) for form in forms]


def choose_task(mixture: Mapping[str, float], available: Sequence[str], rng: np.random.Generator) -> str:
    """A task drawn with the mixture's weights, renormalised over the tasks the record allows."""
    weights = np.array([float(mixture.get(task, 0.0)) for task in available])
    if not weights.sum() > 0:
        raise ValueError(f"sft.mixture gives no weight to any task this record allows ({', '.join(available)})")
    return available[int(rng.choice(len(available), p=weights / weights.sum()))]


def _shortest_text(example: TaskExample, segment: int) -> int:
    """Tokens a text segment keeps when cut: one, and in the targets' segment what precedes the first target and one
    of it."""
    first = example.targets[0]
    return first.start + 1 if segment == first.segment else 1


def shortest_length(example: TaskExample) -> int:
    """The serialised length of the example with every text segment cut to its shortest (images are never cut)."""
    return serialized_length(example.document) - sum(
        len(s.tokens) - _shortest_text(example, i) for i, s in enumerate(example.document)
        if s.modality == vocab_lib.MODALITY_TEXT)


def fit_task_example(example: TaskExample, max_tokens: int) -> TaskExample:
    """Cuts text from the end of the longest text segment until the serialised example has at most `max_tokens`
    tokens, keeping at least one token of the first target. Of several targets only whole ones are kept, the text
    ending with the last of them. Images are never cut: an example whose images alone do not fit raises ValueError
    (train.seq_len is too short for the task)."""
    if shortest_length(example) > max_tokens:
        raise ValueError(f"an SFT {example.task} example needs {shortest_length(example)} tokens with its text cut "
                         f"to the least, more than the {max_tokens} it may take: raise train.seq_len")
    document, targets = list(example.document), example.targets
    excess = serialized_length(document) - max_tokens
    while excess > 0:
        texts = [i for i, s in enumerate(document) if s.modality == vocab_lib.MODALITY_TEXT
                 and len(s.tokens) > _shortest_text(example, i)]
        i = max(texts, key=lambda j: len(document[j].tokens))
        keep = _shortest_text(example, i)
        kept = len(document[i].tokens) - min(excess, len(document[i].tokens) - keep)
        if i == targets[0].segment:
            whole = [t for t in targets if t.end <= kept]
            if whole and len(whole) < len(targets):  # a later target would be cut: end with the last whole one
                kept, targets = whole[-1].end, tuple(whole)
            elif not whole:
                targets = (Span(targets[0].segment, targets[0].start, kept),)
        excess -= len(document[i].tokens) - kept
        document[i] = Segment(document[i].modality, document[i].tokens[:kept])
    return TaskExample(example.task, document, targets)


def target_token_weights(example: TaskExample) -> list[np.ndarray]:
    """Per segment and token: 1 on the targets, 0 elsewhere (`sft.loss_on=target`)."""
    weights = [np.zeros(len(s.tokens), np.float32) for s in example.document]
    for target in example.targets:
        weights[target.segment][target.start:target.end] = 1.0
    return weights


@dataclasses.dataclass(frozen=True)
class SFTOptions:
    mixture: tuple[tuple[str, float], ...] = tuple(default("sft.mixture").items())
    loss_on: str = default("sft.loss_on")  # all (CM3leon) | target (the answer alone)
    cm3: bool = default("sft.cm3")  # CM3 spans drawn over the whole example, as in pretraining
    condition_dropout: float = default("sft.condition_dropout")  # guided examples given as a guidance stream
    vqa_pairs: int = default("sft.vqa_pairs")  # question-answer pairs a VQA example may ask

    @classmethod
    def from_config(cls, sft_config) -> SFTOptions:
        return cls(tuple((str(k), float(v)) for k, v in sft_config.mixture.items()), str(sft_config.loss_on),
                   bool(sft_config.cm3), float(sft_config.condition_dropout), int(sft_config.vqa_pairs))


class RecordToTaskExample:
    """(global index, source index, record) -> one SFT example: a task drawn from the mixture among those the record
    allows, its template (with probability sft.condition_dropout a guided task's example is one of its guidance
    streams instead: the condition masked, the target kept), CM3 spans (the target's where it is infilled, random
    ones with sft.cm3), loss weights per sft.loss_on. Per token it also gives `task` (1 + the task's index in
    TASKS), and it counts the examples of each task. Picklable for grain workers: the text tokenizer is rebuilt
    from its model bytes in each process."""

    sequence_keys = ("inputs", "targets", "loss_weights", "image_cells", "task")
    # sft_too_long: examples whose prompt did not fit train.seq_len, trained as the record's text -> image instead.
    # sft_unconditional: guided examples given as a guidance stream (sft.condition_dropout).
    counter_keys = (COUNTER_KEYS + ("sft_too_long", "sft_unconditional")
                    + tuple(f"task_{task}" for task in TASKS))

    def __init__(self, vocab: vocab_lib.UnifiedVocab, options: PipelineOptions, sft: SFTOptions,
                 text_model: bytes, image_size: int, label_names: Sequence[str] | None = None):
        self.vocab, self.options, self.sft = vocab, options, sft
        self.text_model, self.image_size, self.label_names = text_model, image_size, label_names
        self._templates: TaskTemplates | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_templates": None}

    @property
    def templates(self) -> TaskTemplates:
        if self._templates is None:
            from cm3jax.tokenizers.text import TextTokenizer

            text = TextTokenizer(self.text_model)
            self._templates = TaskTemplates(lambda s: self.vocab.text_ids(text.encode(s)), self.image_size,
                                            self.label_names, self.sft.vqa_pairs)
        return self._templates

    def __call__(self, item: tuple[int, int, bytes]) -> dict:
        global_index, source_index, data = item
        o = self.options
        rng = np.random.default_rng([o.seed, global_index])
        record = record_of(*decode_document_record(data))
        if record is None:
            raise ValueError(f"record {source_index} of the token shards is not a caption-image document: SFT "
                             f"builds its tasks from caption-image records")
        task = choose_task(dict(self.sft.mixture), self.templates.available(record), rng)
        example = self.templates.build(task, record, rng, image_first=bool(rng.random() < o.image_first_probability))
        room = o.seq_len + 1 - cm3.TOKENS_ADDED_PER_SPAN * example.infilled_spans
        too_long = shortest_length(example) > room
        if too_long:
            task = "text_to_image"
            example, room = self.templates.build(task, record, rng, image_first=False), o.seq_len + 1
        unconditional = False
        if self.sft.condition_dropout and task in GUIDED_TASKS and rng.random() < self.sft.condition_dropout:
            forms = guidance_stream_forms(example, self.vocab)
            example, unconditional = forms[int(rng.integers(len(forms)))], True
        # Random spans are drawn as in pretraining, as many as leave room for the example and mask tokens for the
        # targets' spans; none in a guidance stream's form, whose prompt already holds the masks it decodes from.
        num_spans = min(cm3.draw_span_count(rng, o.cm3) if self.sft.cm3 and not unconditional else 0,
                        max(0, room - shortest_length(example)) // cm3.TOKENS_ADDED_PER_SPAN,
                        self.vocab.num_masks - example.infilled_spans)
        length = serialized_length(example.document)
        example = fit_task_example(example, room - cm3.TOKENS_ADDED_PER_SPAN * num_spans)
        spans = cm3.sample_spans([len(s.tokens) for s in example.document], num_spans + example.infilled_spans, rng,
                                 example.targets if example.infilled else ())
        if self.sft.loss_on == "target":
            masked = cm3.cm3_mask_document(example.document, spans, self.vocab,
                                           segment_weights=[0.0] * len(example.document),
                                           token_weights=target_token_weights(example),
                                           final_weight=float(not example.infilled))
        else:
            masked = cm3.cm3_mask_document(example.document, spans, self.vocab)
        return {
            "inputs": masked.tokens[:-1],
            "targets": masked.tokens[1:],
            "loss_weights": masked.weights[1:],
            "image_cells": masked.image_cells[:-1],
            "task": np.full(len(masked.tokens) - 1, 1 + TASKS.index(task), np.int32),
            "text_tokens_cut": np.int64(length - serialized_length(example.document)),
            "segments_dropped": np.int64(0),
            "retrieved_dropped": np.int64(0),
            "sft_too_long": np.int64(too_long),
            "sft_unconditional": np.int64(unconditional),
            **{f"task_{name}": np.int64(name == task) for name in TASKS},
        }
