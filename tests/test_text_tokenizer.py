"""SentencePiece text tokenizer: exact round trips on odd strings, size bound, save/load."""
import numpy as np
import pytest

from cm3jax.tokenizers.text import TextTokenizer

CORPUS = [f"a handwritten {w}" for w in "zero one two three four five six seven eight nine".split()] * 30 + [
    "the digit 7 written in ink", "a large red circle in the top left and a small blue square"] * 20

ODD_STRINGS = ["", " ", "a handwritten seven", "  two  spaces  ", "日本語のテキスト", "emoji 🦎 ok",
               "tab\tnew\nline\r\n", "Ｆｕｌｌｗｉｄｔｈ", "\x00nul", "Ünïcödé ß", "مرحبا", "12345", "x" * 300]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CORPUS, vocab_size=512)


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_round_trip_is_exact(tokenizer, text):
    pieces = tokenizer.encode(text)
    assert pieces.dtype == np.int32 and np.all((pieces >= 0) & (pieces < tokenizer.vocab_size))
    assert tokenizer.decode(pieces) == text
    assert 0 not in pieces.tolist()  # byte fallback: never <unk>


def test_size_bound_learned_pieces_and_save_load(tokenizer, tmp_path):
    assert 256 < tokenizer.vocab_size <= 512  # byte pieces plus what the corpus taught
    assert len(tokenizer.encode("a handwritten seven")) < len(b"a handwritten seven")
    tokenizer.save(str(tmp_path / "text.model"))
    loaded = TextTokenizer.load(str(tmp_path / "text.model"))
    assert loaded.encode("a handwritten seven").tolist() == tokenizer.encode("a handwritten seven").tolist()


def test_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="no non-empty text"):
        TextTokenizer.train(["", ""], vocab_size=300)


def test_too_small_a_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab.text_size"):
        TextTokenizer.train(CORPUS, vocab_size=96)  # fewer than the 256 byte pieces


def test_piece_ids_past_the_model_are_dropped_when_decoding(tokenizer):
    """The vocabulary's text range can hold more ids than the model has pieces, and an LM can sample them."""
    pieces = tokenizer.encode("a red circle")
    assert tokenizer.decode(np.concatenate([pieces, [tokenizer.vocab_size, 10**6]])) == "a red circle"
