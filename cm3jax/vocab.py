"""The unified token-id layout: special tokens, then text pieces, then image codes.

This is the only module that does arithmetic on token ids. Every other module asks it for ids, ranges and
modalities, so changing the layout (say, more mask tokens) is a change here and nowhere else.

Layout (contiguous ranges):
    [0, 4)                          <pad>, <eos>, <break>, <eoss>
    [4, 4 + M)                      <mask:0> ... <mask:M-1>   (CM3 sentinels)
    [text_offset, image_offset)     text pieces (SentencePiece ids, shifted)
    [image_offset, size)            image codes (VQ-GAN codebook indices, shifted)
The model's embedding table is `padded_size` rows (a multiple of 128, so the vocabulary axis shards and tiles well);
the rows past `size` are never produced by the data and are masked out when decoding.

The layout is saved as `vocab.json` next to the token shards (by `cm3jax tokenize`) and with each trained model; every
stage that reads ids checks the saved layout against its config's `vocab` section before it starts.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from etils import epath

from cm3jax.errors import MissingInputError, UserError
from cm3jax.storage import PathLike, atomic_write_text

PAD, EOS, BREAK, EOSS = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<eoss>")

MODALITY_SPECIAL, MODALITY_TEXT, MODALITY_IMAGE = 0, 1, 2
VOCAB_FILE = "vocab.json"
_SIZE_FIELDS = ("text_size", "image_codebook_size", "num_masks", "pad_to_multiple")


class VocabMismatchError(UserError, ValueError):
    """Saved token ids were laid out with another vocabulary than the config's."""


@dataclasses.dataclass(frozen=True)
class UnifiedVocab:
    """Sizes of the three id ranges; see the module docstring for the layout."""

    text_size: int
    image_codebook_size: int
    num_masks: int = 32
    pad_to_multiple: int = 128

    def __post_init__(self):
        for name in _SIZE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"vocab.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, vocab_config) -> UnifiedVocab:
        return cls(
            text_size=int(vocab_config.text_size),
            image_codebook_size=int(vocab_config.image_codebook_size),
            num_masks=int(vocab_config.num_masks),
            pad_to_multiple=int(vocab_config.pad_to_multiple),
        )

    def to_dict(self) -> dict:
        """The sizes, plus the derived ranges for a reader of the file."""
        return {**{name: getattr(self, name) for name in _SIZE_FIELDS}, "special_tokens": list(SPECIAL_TOKENS),
                "text_offset": self.text_offset, "image_offset": self.image_offset, "size": self.size,
                "padded_size": self.padded_size}

    def save(self, folder: PathLike) -> epath.Path:
        """Writes folder/vocab.json (whole or not at all); returns its path."""
        path = epath.Path(folder) / VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, folder: PathLike) -> UnifiedVocab:
        saved = json.loads((epath.Path(folder) / VOCAB_FILE).read_text())
        return cls(**{name: int(saved[name]) for name in _SIZE_FIELDS})

    def require_same(self, saved: UnifiedVocab, where: str) -> None:
        """Raises VocabMismatchError naming every vocab.* field where this (configured) layout differs from saved."""
        diffs = [f"vocab.{name}={getattr(self, name)} but {getattr(saved, name)} there" for name in _SIZE_FIELDS
                 if getattr(self, name) != getattr(saved, name)]
        if diffs:
            raise VocabMismatchError(f"the config's vocabulary differs from the one saved in {where}: "
                                     f"{'; '.join(diffs)}. Set the config to the saved layout, or re-tokenize.")

    @property
    def mask_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def text_offset(self) -> int:
        return self.mask_offset + self.num_masks

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_size

    @property
    def size(self) -> int:
        return self.image_offset + self.image_codebook_size

    @property
    def padded_size(self) -> int:
        m = self.pad_to_multiple
        return -(-self.size // m) * m

    def mask_id(self, i: int) -> int:
        if not 0 <= i < self.num_masks:
            raise ValueError(f"mask index {i} outside [0, {self.num_masks})")
        return self.mask_offset + i

    def is_mask(self, ids: np.ndarray) -> np.ndarray:
        """True where an id is one of the CM3 sentinels <mask:i>."""
        ids = np.asarray(ids)
        return (ids >= self.mask_offset) & (ids < self.mask_offset + self.num_masks)

    def text_ids(self, pieces: np.ndarray) -> np.ndarray:
        """SentencePiece ids -> unified ids."""
        pieces = np.asarray(pieces)
        if pieces.size and (pieces.min() < 0 or pieces.max() >= self.text_size):
            raise ValueError(f"text piece id outside [0, {self.text_size})")
        return (pieces + self.text_offset).astype(np.int32)

    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        """VQ-GAN codebook indices -> unified ids."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_codebook_size):
            raise ValueError(f"image code outside [0, {self.image_codebook_size})")
        return (codes + self.image_offset).astype(np.int32)

    def text_pieces(self, ids: np.ndarray) -> np.ndarray:
        """Unified ids of text tokens -> SentencePiece ids (the inverse of text_ids)."""
        ids = np.asarray(ids)
        if ids.size and np.any(self.modality(ids) != MODALITY_TEXT):
            raise ValueError("ids outside the text range")
        return (ids - self.text_offset).astype(np.int32)

    def image_codes(self, ids: np.ndarray) -> np.ndarray:
        """Unified ids of image tokens -> VQ-GAN codebook indices (the inverse of image_ids)."""
        ids = np.asarray(ids)
        if ids.size and np.any(self.modality(ids) != MODALITY_IMAGE):
            raise ValueError("ids outside the image range")
        return (ids - self.image_offset).astype(np.int32)

    def modality(self, ids):
        """Per-token modality (MODALITY_SPECIAL / _TEXT / _IMAGE); works on numpy and jax arrays alike."""
        xp = np if isinstance(ids, np.ndarray) else _jnp()
        ids = xp.asarray(ids)
        is_text = (ids >= self.text_offset) & (ids < self.image_offset)
        is_image = (ids >= self.image_offset) & (ids < self.size)
        return xp.where(is_image, MODALITY_IMAGE, xp.where(is_text, MODALITY_TEXT, MODALITY_SPECIAL)).astype(xp.int32)


def require_saved_vocab(configured: UnifiedVocab, folder: PathLike) -> None:
    """Checks folder/vocab.json against the configured layout; a folder without one is an error."""
    path = epath.Path(folder) / VOCAB_FILE
    if not path.exists():
        raise MissingInputError(f"{folder} has no {VOCAB_FILE}: token shards are written by `cm3jax tokenize`, "
                                f"which saves the vocabulary layout with them")
    configured.require_same(UnifiedVocab.load(folder), str(path))


def check_or_save_vocab(vocab: UnifiedVocab, folder: PathLike, write: bool) -> None:
    """A folder that already holds a layout (a resumed run) must match `vocab`; otherwise it is saved there (by the
    one process with `write`)."""
    if (epath.Path(folder) / VOCAB_FILE).exists():
        require_saved_vocab(vocab, folder)
    elif write:
        vocab.save(folder)


def _jnp():
    import jax.numpy as jnp

    return jnp
