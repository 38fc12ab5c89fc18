"""Synthetic caption-image documents: a random-access record source for tests and benchmarks that need documents
without a tokenizer run (data.source="synthetic").

Each document is a caption segment and an image segment in the unified vocabulary. It draws a class c; its caption
uses text pieces of that class and its image codes are a fixed per-class pattern with 10% of codes resampled, so the
image is predictable from the caption (text->image in miniature) and the loss has something to learn. Record i of a
split depends only on (seed, split, i).
"""
from __future__ import annotations

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import Document, encode_document_record, image_segment, text_segment

NUM_CLASSES = 10
_SPLIT_IDS = {"train": 0, "validation": 1}


class SyntheticDocumentSource:
    """`len(source)` records; `source[i]` is an encoded document record (see documents.py)."""

    def __init__(self, vocab: vocab_lib.UnifiedVocab, *, num_records: int, split: str = "train", seed: int = 0,
                 text_len: int = 24, image_tokens: int = 64, text_pieces: int = 512):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if text_pieces > vocab.text_size or text_pieces < NUM_CLASSES:
            raise ValueError(f"data.synthetic_text_pieces={text_pieces} must be in [{NUM_CLASSES}, vocab.text_size]")
        self.vocab = vocab
        self.num_records = num_records
        self.split_id = _SPLIT_IDS[split]
        self.seed = seed
        self.text_len = text_len
        self.image_tokens = image_tokens
        self.pieces_per_class = text_pieces // NUM_CLASSES
        pattern_rng = np.random.default_rng([seed, 1234])
        self.class_images = pattern_rng.integers(0, vocab.image_codebook_size, (NUM_CLASSES, image_tokens))

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> bytes:
        document, label = self.document(index)
        return encode_document_record(document, {"index": int(index), "label": label})

    def document(self, index: int) -> tuple[Document, int]:
        if not 0 <= index < self.num_records:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.split_id, index])
        c = int(rng.integers(NUM_CLASSES))
        pieces = c * self.pieces_per_class + rng.integers(0, self.pieces_per_class, self.text_len)
        codes = self.class_images[c].copy()
        resample = rng.random(self.image_tokens) < 0.1
        codes[resample] = rng.integers(0, self.vocab.image_codebook_size, int(resample.sum()))
        return [text_segment(self.vocab.text_ids(pieces)), image_segment(self.vocab.image_ids(codes))], c
