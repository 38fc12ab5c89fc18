"""Synthetic caption-image token documents: a stand-in source for tests, benchmarks and the demo until the real data
pipeline is wired in. Every batch follows the DESIGN.md batch contract exactly.

Each document is `<eos> caption <break> image-codes <eos>` in the unified vocabulary. A document draws a class c; its
caption uses text pieces of that class and its image codes are a fixed per-class pattern with 10% of codes resampled,
so the image is predictable from the caption (the text->image skill, in miniature) and the loss has something to learn.
Documents are packed first-fit into rows with `segment_ids` (1.. per document, 0 = padding) and `positions` that
restart per document. Row r of step s depends only on (seed, split, s, r), so any process can build exactly its own rows
and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import numpy as np

from cm3jax import vocab as vocab_lib

NUM_CLASSES = 10
_SPLIT_IDS = {"train": 0, "validation": 1}


class SyntheticDocuments:
    """Iterator of local batches (this process's rows of each global batch); state is the next step."""

    def __init__(self, vocab: vocab_lib.UnifiedVocab, *, seq_len: int, global_batch_size: int, rows: tuple[int, int],
                 split: str = "train", seed: int = 0, text_len: int = 24, image_tokens: int = 64,
                 text_pieces: int = 512):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if text_pieces > vocab.text_size or text_pieces < NUM_CLASSES:
            raise ValueError(f"data.synthetic_text_pieces={text_pieces} must be in [{NUM_CLASSES}, vocab.text_size]")
        self.vocab = vocab
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rows = rows
        self.split_id = _SPLIT_IDS[split]
        self.seed = seed
        self.text_len = text_len
        self.image_tokens = image_tokens
        self.pieces_per_class = text_pieces // NUM_CLASSES
        pattern_rng = np.random.default_rng([seed, 1234])
        self.class_images = pattern_rng.integers(0, vocab.image_codebook_size, (NUM_CLASSES, image_tokens))
        self.step = 0

    # Iterator protocol and checkpointable state.
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rows = [self._row(step, r) for r in range(*self.rows)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def _document(self, rng: np.random.Generator) -> np.ndarray:
        c = rng.integers(NUM_CLASSES)
        pieces = c * self.pieces_per_class + rng.integers(0, self.pieces_per_class, self.text_len)
        codes = self.class_images[c].copy()
        resample = rng.random(self.image_tokens) < 0.1
        codes[resample] = rng.integers(0, self.vocab.image_codebook_size, int(resample.sum()))
        return np.concatenate([[vocab_lib.EOS], self.vocab.text_ids(pieces), [vocab_lib.BREAK],
                               self.vocab.image_ids(codes), [vocab_lib.EOS]]).astype(np.int32)

    def _row(self, step: int, row: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, step, row])
        n = self.seq_len
        out = {
            "inputs": np.full(n, vocab_lib.PAD, np.int32),
            "targets": np.full(n, vocab_lib.PAD, np.int32),
            "loss_weights": np.zeros(n, np.float32),
            "segment_ids": np.zeros(n, np.int32),
            "positions": np.zeros(n, np.int32),
        }
        filled, segment = 0, 1
        while filled < n:
            doc = self._document(rng)
            length = min(len(doc) - 1, n - filled)  # a document contributes len-1 (input, target) pairs
            if length < 2:
                break
            span = slice(filled, filled + length)
            out["inputs"][span] = doc[:length]
            out["targets"][span] = doc[1:length + 1]
            out["loss_weights"][span] = 1.0
            out["segment_ids"][span] = segment
            out["positions"][span] = np.arange(length)
            filled += length
            segment += 1
        out["modality"] = self.vocab.modality(out["targets"])
        return out
