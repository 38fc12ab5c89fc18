"""The unified vocabulary as a Hugging Face fast tokenizer (`tokenizer.json`) that gives cm3jax's ids for any string.

Every id of the layout (vocab.py) is one entry of a Unigram model, in id order: the special and mask tokens, the
SentencePiece pieces with their scores (the text range; ids past the trained pieces are unused placeholders), then one
`<img:i>` token per image code. Tokens that text must never produce (specials, placeholders, image codes) get a score
no segmentation would choose, and are not "added tokens": transformers would cut a literal "<eos>" out of the text,
while cm3jax's text tokenizer spells it in pieces. The pre-tokenizer and decoder repeat the SentencePiece settings of
tokenizers/text.py: identity normalisation, split at whitespace with no dummy prefix, digits split, byte fallback.
"""
from __future__ import annotations

import json
import os

from cm3jax import vocab as vocab_lib
from cm3jax.storage import PathLike

UNREACHABLE_SCORE = -1e9
SPACE = "\u2581"


def image_token(code: int) -> str:
    return f"<img:{code}>"


def mask_token(index: int) -> str:
    return f"<mask:{index}>"


def unified_pieces(vocab: vocab_lib.UnifiedVocab, sentencepiece_model: bytes) -> list[tuple[str, float]]:
    """(token, score) for every id of the padded layout, in id order."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model)
    pieces = [(name, UNREACHABLE_SCORE) for name in vocab_lib.SPECIAL_TOKENS]
    pieces += [(mask_token(i), UNREACHABLE_SCORE) for i in range(vocab.num_masks)]
    trained = [(p.piece, float(p.score)) for p in proto.pieces]
    pieces += trained + [(f"<unused_text:{i}>", UNREACHABLE_SCORE) for i in range(len(trained), vocab.text_size)]
    pieces += [(image_token(c), UNREACHABLE_SCORE) for c in range(vocab.image_codebook_size)]
    pieces += [(f"<unused:{i}>", UNREACHABLE_SCORE) for i in range(vocab.size, vocab.padded_size)]
    return pieces


def tokenizer_json(vocab: vocab_lib.UnifiedVocab, sentencepiece_model: bytes) -> dict:
    """The `tokenizers` library's serialised Tokenizer for the unified vocabulary."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never", "split": True},
            {"type": "Digits", "individual_digits": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "Unigram", "unk_id": vocab.text_offset, "byte_fallback": True,
                  "vocab": [[token, score] for token, score in unified_pieces(vocab, sentencepiece_model)]},
    }


def save_tokenizer(folder: PathLike, vocab: vocab_lib.UnifiedVocab, sentencepiece_model: bytes) -> list[str]:
    """Writes tokenizer.json and tokenizer_config.json (AutoTokenizer loads them with no custom code)."""
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(vocab, sentencepiece_model), f, ensure_ascii=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": vocab_lib.SPECIAL_TOKENS[vocab_lib.PAD],
        "eos_token": vocab_lib.SPECIAL_TOKENS[vocab_lib.EOS],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]
