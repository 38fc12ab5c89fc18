"""Retrieval for generation: the memory bank built by `cm3jax retrieve`, queried with a prompt.

    bank = MemoryBank.load(config, workdir)
    retrieved = bank.retrieve("a handwritten seven", k=2)       # or an RGB image array, or a Document
    tokens = prepend_retrieved(retrieved, prompt_tokens)         # `<eos> doc_1 <eos> doc_2 <eos> prompt...`

The prompt is embedded like a training query (its text with the text tower, an image's VQ-GAN codes with the image
tower, a document's parts combined), and the neighbours are chosen by the same strategy as in training: no
near-copies of the prompt or of each other, multimodal documents first. With retrieval.embeddings (vectors computed
elsewhere), a prompt must be given as its embedding vector from the same model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data.documents import Document, decode_document_record, image_segment, serialize_document, text_segment
from cm3jax.data.shards import open_token_shards
from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.retrieval.embeddings import RetrieverEncoder, embed_documents, l2_normalize
from cm3jax.retrieval.index import VectorIndex, load_index
from cm3jax.retrieval.neighbours import StrategyOptions, select_neighbours
from cm3jax.storage import load_arrays
from cm3jax.workdir import StageDir, Workdir

Prompt = str | np.ndarray | Document


class MemoryBank:
    def __init__(self, index: VectorIndex, records: Sequence[bytes], bank_vectors: np.ndarray,
                 multimodal: np.ndarray, options: StrategyOptions, encoder=None,
                 prompt_document: Callable[[str | np.ndarray], Document] | None = None):
        """`encoder` embeds queries (None: only embedding vectors are accepted as prompts); `prompt_document` turns
        a caption or an RGB image into a Document of unified ids."""
        self.index, self.records, self.bank_vectors, self.multimodal = index, records, bank_vectors, multimodal
        self.options, self.encoder, self.prompt_document = options, encoder, prompt_document

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: Workdir | str) -> MemoryBank:
        """The bank, index and retriever that `cm3jax retrieve` wrote under DIR/retrieval, with the run's text
        tokenizer and VQ-GAN to read prompts."""
        workdir = Workdir.of(workdir)
        config = workdir.resolve(config)
        stage_dir = workdir.retrieval
        chunks = sorted(stage_dir.bank.glob(f"{config.data.train_split}-*.npz")) if stage_dir.bank.is_dir() else []
        if not chunks or not stage_dir.index.is_dir():
            raise MissingInputError(f"no memory bank under {stage_dir}: run `cm3jax retrieve` first")
        loaded = [load_arrays(p) for p in chunks]
        vectors = np.concatenate([c["vectors"] for c in loaded]).astype(np.float32)
        multimodal = np.concatenate([c["multimodal"] for c in loaded])
        token_dir = config.data.token_dir
        records = open_token_shards(token_dir, config.data.train_split)
        if len(records) != len(vectors):
            raise BadInputError(f"{stage_dir}/bank holds {len(vectors)} embeddings but {token_dir} has {len(records)} "
                             f"train documents: rerun `cm3jax retrieve` on this workdir")
        encoder, reader = None, None
        if not config.retrieval.embeddings:
            encoder = _restore_encoder(config, stage_dir.retriever)
            reader = PromptReader(config, workdir)
        return cls(load_index(str(stage_dir.index)), records, vectors, multimodal,
                   StrategyOptions.from_config(config.retrieval), encoder, reader)

    def query_vector(self, prompt: Prompt) -> np.ndarray:
        """[dim] unit vector of a caption, an RGB image [H, W, 3], a Document, or an embedding vector [dim]."""
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
            if prompt.shape[0] != self.bank_vectors.shape[1]:
                raise ValueError(f"a prompt embedding must have dimension {self.bank_vectors.shape[1]}, got "
                                 f"{prompt.shape[0]}")
            return l2_normalize(prompt)
        if self.encoder is None:
            raise ValueError("this memory bank was built from embeddings computed elsewhere (retrieval.embeddings): "
                             "pass the prompt's embedding vector from the same model")
        document = prompt if isinstance(prompt, list) else self.prompt_document(prompt)
        return embed_documents([(0, document)], self.encoder)[0][0]

    def retrieve(self, prompt: Prompt, k: int = 2) -> list[Document]:
        """Up to k memory-bank documents for the prompt, best first."""
        options = dataclasses.replace(self.options, num_neighbours=k)
        scores, ids = self.index.search(self.query_vector(prompt)[None], options.candidates)
        chosen = select_neighbours(ids[0], scores[0], self.bank_vectors, self.multimodal, -1, options)
        return [decode_document_record(self.records[int(i)])[0] for i in chosen if i >= 0]


def prepend_retrieved(retrieved: Sequence[Document], prompt: np.ndarray) -> np.ndarray:
    """The retrieved documents serialised as in training, `<eos> doc_1 <eos> doc_2 <eos>`, followed by the prompt
    tokens (which start with their own <eos>, e.g. `<eos> caption <break>`)."""
    prompt = np.asarray(prompt, np.int32)
    if len(prompt) == 0 or prompt[0] != vocab_lib.EOS:
        raise ValueError("the prompt must start with <eos>, as every serialised document does")
    parts = [serialize_document(document)[:-1] for document in retrieved]  # the next document's <eos> ends it
    return np.concatenate(parts + [prompt])


class PromptReader:
    """Caption -> text document (the run's SentencePiece model); RGB image -> image document (the run's VQ-GAN,
    loaded on first use)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Workdir):
        self.config, self.workdir = config, workdir
        self.vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
        self._text, self._image_tokenizer = None, None

    def __call__(self, prompt: str | np.ndarray) -> Document:
        if isinstance(prompt, str):
            return [text_segment(self.vocab.text_ids(self.text_pieces(prompt)))]
        return [image_segment(self.vocab.image_ids(self.image_codes(prompt)))]

    def text_pieces(self, caption: str) -> np.ndarray:
        from cm3jax.tokenizers.text import TextTokenizer

        if self._text is None:
            self._text = TextTokenizer.load(str(self.workdir.text_tokenizer))
        return self._text.encode(caption)

    def image_codes(self, image: np.ndarray) -> np.ndarray:
        from cm3jax.tokenizers.image import ImageTokenizer

        if self._image_tokenizer is None:
            self._image_tokenizer = ImageTokenizer.load(self.config, self.workdir)
        return self._image_tokenizer.encode_image(np.asarray(image)).reshape(-1)


def _restore_encoder(config: ml_collections.ConfigDict, retriever_dir: StageDir) -> RetrieverEncoder:
    from cm3jax.models.retriever import RetrieverConfig
    from cm3jax.parallel.mesh import data_parallel_mesh
    from cm3jax.train.loop import restore_latest_state
    from cm3jax.train.retriever import retriever_stage_config, retriever_state_init

    stage = retriever_stage_config(config)
    state, _ = restore_latest_state(retriever_state_init(stage)[0], stage, data_parallel_mesh(jax.local_devices()[:1]),
                                    str(retriever_dir), "`cm3jax retrieve`")
    return RetrieverEncoder(jax.device_get(state.params), RetrieverConfig.from_config(config),
                            vocab_lib.UnifiedVocab.from_config(config.vocab), int(config.retriever.embed_batch_size))
