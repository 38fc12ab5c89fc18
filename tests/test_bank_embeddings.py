"""Document embeddings from text and image parts, and user-provided embedding files."""
import numpy as np
import pytest

from cm3jax.retrieval.embeddings import check_rows, document_embeddings, l2_normalize, load_embedding_file


def test_document_embedding_is_the_normalised_mean_of_normalised_parts():
    text = np.array([[3.0, 0, 0], [1, 1, 0], [0, 2, 0]], np.float32)
    image = np.array([[0, 0, 5.0], [0, 0, 0], [0, 0, 1]], np.float32)
    out = document_embeddings(text, image, has_text=[True, True, False], has_image=[True, False, True])
    np.testing.assert_allclose(out[0], np.array([1, 0, 1]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(out[1], l2_normalize(text[1]), rtol=1e-6)  # text-only document
    np.testing.assert_allclose(out[2], [0, 0, 1], rtol=1e-6)  # image-only: its text row is ignored
    with pytest.raises(ValueError, match="neither text nor image"):
        document_embeddings(text, image, has_text=[False] * 3, has_image=[True, False, True])


def test_user_embeddings_are_checked_and_normalised(tmp_path):
    path = str(tmp_path / "clip.npy")
    np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3) + 1)
    vectors = load_embedding_file(path, expected_count=4, expected_dim=3)
    np.testing.assert_array_equal(vectors, np.arange(12).reshape(4, 3) + 1)
    with pytest.raises(ValueError, match="4 rows but the split has 5 documents"):
        load_embedding_file(path, expected_count=5)
    with pytest.raises(ValueError, match="dimension 3, expected 512"):
        load_embedding_file(path, expected_count=4, expected_dim=512)
    np.save(path, np.array([[1.0, 0], [np.nan, 1]], np.float32))
    with pytest.raises(ValueError, match=r"rows \[1\] are zero, NaN or infinite"):
        load_embedding_file(path, expected_count=2)
    part = load_embedding_file(path, expected_count=2, allow_empty_rows=True)  # a part file: checked on lookup
    with pytest.raises(ValueError, match=r"rows \[1\] are zero"):
        check_rows(part, np.array([0, 1]), path)
    np.save(path, np.arange(4))
    with pytest.raises(ValueError, match="2-D float array"):
        load_embedding_file(path, expected_count=4)
    with pytest.raises(FileNotFoundError, match="one embedding row per document"):
        load_embedding_file(str(tmp_path / "missing.npy"), expected_count=4)
