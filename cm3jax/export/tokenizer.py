"""The unified vocabulary as a Hugging Face fast tokenizer (`tokenizer.json`) that gives cm3jax's ids for any string.

Every id of the layout (vocab.py) is one entry of a Unigram model, in id order: the special and mask tokens, the
SentencePiece pieces with their scores (the text range; ids past the trained pieces are unused placeholders), then one
token per image code. The pre-tokenizer and decoder repeat the SentencePiece settings of tokenizers/text.py: identity
normalisation, split at whitespace with no dummy prefix, digits split, byte fallback.

Text must never produce a special, mask, placeholder or image-code token, nor SentencePiece's own `<unk>`: cm3jax's
text tokenizer spells a literal "<eos>" in pieces. So their names hold a plain space ("<cm3 eos>"), which the
pre-tokenizer has already turned into "▁" in any text the model segments, and they are not "added tokens" (those
transformers would cut out of the raw text). Their score is 0, as SentencePiece gives its own control pieces, so the
penalty for an unknown character (the lowest score less 10) is SentencePiece's. Byte pieces ("<0x41>") keep their
names, which byte fallback looks up; text cannot produce them either, since every digit is a pre-token of its own.
"""
from __future__ import annotations

import json

from etils import epath

from cm3jax import vocab as vocab_lib
from cm3jax.export.opt import UnexportableModelError
from cm3jax.storage import PathLike

SPACE = "\u2581"
UNREACHABLE_SCORE = 0.0


def special_token(name: str) -> str:
    """'<eos>' -> '<cm3 eos>': the tokenizer's name of a token that text never produces."""
    return f"<cm3 {name.strip('<>')}>"


def image_token(code: int) -> str:
    return f"<cm3 img {code}>"


def mask_token(index: int) -> str:
    return f"<cm3 mask {index}>"


def unified_pieces(vocab: vocab_lib.UnifiedVocab, sentencepiece_model: bytes) -> list[tuple[str, float]]:
    """(token, score) for every id of the padded layout, in id order."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        raise UnexportableModelError(f"config.tokenize.text_model_type={kind!r}: the hf export writes a unigram "
                                     f"text tokenizer only; export with --config.export.format=params")
    normal = (proto.SentencePiece.NORMAL, proto.SentencePiece.BYTE)
    pieces = [(special_token(name), UNREACHABLE_SCORE) for name in vocab_lib.SPECIAL_TOKENS]
    pieces += [(mask_token(i), UNREACHABLE_SCORE) for i in range(vocab.num_masks)]
    pieces += [(p.piece, float(p.score)) if p.type in normal else (f"<cm3 sp {p.piece}>", float(p.score))
               for p in proto.pieces]
    pieces += [(special_token(f"unused text {i}"), UNREACHABLE_SCORE)
               for i in range(len(proto.pieces), vocab.text_size)]
    pieces += [(image_token(c), UNREACHABLE_SCORE) for c in range(vocab.image_codebook_size)]
    pieces += [(special_token(f"unused {i}"), UNREACHABLE_SCORE) for i in range(vocab.size, vocab.padded_size)]
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
    """Writes tokenizer.json and tokenizer_config.json (AutoTokenizer loads them with no custom code). No pad or eos
    token is declared: transformers would then match their names in raw text; generation_config.json gives the ids."""
    folder = epath.Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, sentencepiece_model), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
