"""The SentencePiece text tokenizer, trained on the corpus captions.

Settings that make encode/decode an exact round trip for any UTF-8 string (empty, non-Latin, emoji, control
characters, runs of spaces): byte fallback (no text is ever unknown), identity normalisation, no whitespace cleanup, no
dummy prefix. SentencePiece's own <bos>/<eos>/<pad> are disabled: the unified vocabulary (vocab.py) has its own special
tokens, and piece ids [0, vocab_size) map to its text range as they are.
"""
from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm
from etils import epath

from cm3jax.storage import PathLike, atomic_write_bytes

MODEL_TYPES = ("unigram", "bpe", "char", "word")


class TextTokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: PathLike) -> TextTokenizer:
        return cls(epath.Path(path).read_bytes())

    def save(self, path: PathLike) -> None:
        atomic_write_bytes(path, self.model_proto)

    @classmethod
    def train(cls, sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
              max_sentences: int = 1_000_000, seed_sentencepiece_size: int = 1_000_000) -> TextTokenizer:
        """Trains on `sentences`. `vocab_size` is an upper bound: a small corpus yields fewer pieces (never more)."""
        if model_type not in MODEL_TYPES:
            raise ValueError(f"text tokenizer model_type {model_type!r} not in {MODEL_TYPES}")
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError("no non-empty text to train the text tokenizer on")
        model = io.BytesIO()
        try:
            _train_sentencepiece(sentences, model, vocab_size, model_type, max_sentences, seed_sentencepiece_size)
        except RuntimeError as e:
            raise ValueError(f"SentencePiece training failed with vocab_size={vocab_size} (vocab.text_size): "
                             f"{e}") from e
        tokenizer = cls(model.getvalue())
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"SentencePiece produced {tokenizer.vocab_size} pieces, more than {vocab_size}")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), np.int32)

    def decode(self, pieces: np.ndarray) -> str:
        """Piece ids -> text; ids past this model's pieces (the vocabulary's text range can be larger, and a model
        can sample them) are dropped."""
        return self._processor.decode([int(p) for p in pieces if 0 <= int(p) < self.vocab_size])


def _train_sentencepiece(sentences: list[str], model: io.BytesIO, vocab_size: int, model_type: str,
                         max_sentences: int, seed_sentencepiece_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2)
