"""The parts of `cm3jax retrieve` (cm3jax/stages/retrieval.py): the memory bank and every document's neighbours.

1. The encoder: the dual encoder trained on the train token shards (DIR/retrieval/retriever, resumes), or
   embeddings computed elsewhere (retrieval.embeddings).
2. The bank: every train document's embedding (bank/train-CCCCC.npz, one file per chunk of retrieval.chunk_size
   documents).
3. The index over the bank (index/, exact or ScaNN by retrieval.index_kind and size).
4. Neighbours of every document of the LM's train and eval splits by the CM3leon strategy (neighbours/SPLIT-CCCCC.npy
   chunks, then neighbours-SPLIT.npy, [documents, retrieval.num_neighbours] train-record ids, -1 for none).

Process p works on chunks c = p mod P and a chunk file that exists is kept, so an interrupted job resumes where it
stopped. `derived.json` records what the kept parts were made with (the encoder's parameters or vectors,
retrieval.chunk_size, the index and neighbour settings): a part made otherwise is removed and rebuilt, with the
parts made from it (a retriever trained on for more steps re-embeds the bank, a new num_neighbours redoes only the
neighbours). Every process loads the whole index. The summary measures the retriever on the eval split: caption -> image
top-1 (the document's own image), and where documents carry a `label`, how often the top image and the first
neighbour share the caption's label, against the chance of that.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from cm3jax.data.documents import Document, decode_document_record
from cm3jax.progress import Progress
from cm3jax.retrieval.embeddings import embed_documents, part_queries
from cm3jax.retrieval.index import INDEX_FILE, IndexOptions, build_index, load_index
from cm3jax.retrieval.neighbours import StrategyOptions, find_neighbours
from cm3jax.storage import atomic_write_text, load_arrays, save_arrays
from cm3jax.workdir import RetrievalDir, neighbours_file

Encoder = Callable  # queries -> [len(queries), dim] unit vectors, with a `dim` attribute
DERIVED_FILE = "derived.json"
RUNTIME_INDEX_OPTIONS = ("training_threads",)  # how fast the index is built, not what it holds


def derived_parts_identity(encoder: str, chunk_size: int, index: IndexOptions, strategy: StrategyOptions) -> dict:
    """What the bank, the index and the neighbours are made with (`discard_outdated_parts`)."""
    index_settings = {k: v for k, v in dataclasses.asdict(index).items() if k not in RUNTIME_INDEX_OPTIONS}
    return {"bank": {"encoder": encoder, "chunk_size": chunk_size}, "index": index_settings,
            "neighbours": dataclasses.asdict(strategy)}


def discard_outdated_parts(folder: RetrievalDir, identity: dict) -> list[str]:
    """Removes the parts of `folder` made with other settings than `identity` (derived_parts_identity), each with
    the parts made from it, then records `identity` (process 0; the others wait). Parts found with no record (made
    by an older cm3jax) count as outdated. Returns the names of the parts removed."""
    path = folder / DERIVED_FILE
    removed: list[str] = []
    if jax.process_index() == 0:
        saved = json.loads(path.read_text()) if path.exists() else {}
        outdated = False
        for part in ("bank", "index", "neighbours"):  # each made from the ones before it
            outdated = outdated or saved.get(part) != identity[part]
            if outdated:
                removed += _remove_part(folder, part)
        if removed:
            folder.mark_incomplete()  # until the parts are rebuilt
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))
    _sync("outdated parts removed")
    return removed


def _remove_part(folder: RetrievalDir, part: str) -> list[str]:
    paths = {"bank": [folder.bank], "index": [folder.index],
             "neighbours": [folder.neighbour_chunks, *folder.path.glob("neighbours-*.npy")]}[part]
    removed = []
    for path in paths:
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


def _sync(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"cm3jax retrieve: {what}")


def _documents(records: Sequence[bytes], start: int, stop: int) -> list[tuple[int, Document]]:
    return [(i, decode_document_record(records[i])[0]) for i in range(start, stop)]


def _chunked(what: str, folder: epath.Path, split: str, count: int, chunk_size: int, suffix: str,
             compute: Callable[[int, int, epath.Path], None]) -> list[epath.Path]:
    """Runs compute(start, stop, path) for this process's missing chunks of `count` documents; returns every
    chunk's path (all processes' chunks exist once the barrier after this returns)."""
    folder.mkdir(parents=True, exist_ok=True)
    num_chunks = max(1, math.ceil(count / chunk_size))
    paths = [folder / f"{split}-{c:05d}.{suffix}" for c in range(num_chunks)]
    todo = [c for c in range(jax.process_index(), num_chunks, jax.process_count()) if not paths[c].exists()]
    progress = Progress(f"{what} {split}", total=max(len(todo), 1))
    for c in todo:
        start, stop = c * chunk_size, min((c + 1) * chunk_size, count)
        compute(start, stop, paths[c])
        progress.advance(f"chunk {c + 1}/{num_chunks}: documents {start}-{stop}")
    _sync(f"{what} {split}")
    return paths


def embed_bank(records: Sequence[bytes], encoder: Encoder, folder: epath.Path, chunk_size: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(document embeddings [N, dim], multimodal [N]) of the bank, from (and into) chunk files under `folder`."""
    def compute(start: int, stop: int, path: epath.Path) -> None:
        vectors, multimodal = embed_documents(_documents(records, start, stop), encoder)
        save_arrays(path, vectors=vectors, multimodal=multimodal)

    paths = _chunked("embed bank", folder, "train", len(records), chunk_size, "npz", compute)
    chunks = [load_arrays(p) for p in paths]
    return (np.concatenate([c["vectors"] for c in chunks]).astype(np.float32),
            np.concatenate([c["multimodal"] for c in chunks]))


def open_or_build_index(folder: epath.Path, bank_vectors: np.ndarray, options: IndexOptions):
    """The saved index when it covers this bank, else process 0 builds and saves it while the others wait."""
    def saved_size() -> int | None:
        path = folder / INDEX_FILE
        whole = path.exists() and (folder / "vectors.npy").exists()
        return json.loads(path.read_text())["size"] if whole else None

    if jax.process_index() == 0 and saved_size() != len(bank_vectors):
        build_index(bank_vectors, options).save(folder)
    _sync("index")
    return load_index(folder)


def compute_neighbours(records: Sequence[bytes], split: str, in_bank: bool, encoder: Encoder, index,
                       bank_vectors: np.ndarray, multimodal: np.ndarray, options: StrategyOptions, folder: epath.Path,
                       chunk_size: int) -> epath.Path:
    """Writes the split's neighbours file next to `folder` (its chunk files inside it); returns its path."""
    def compute(start: int, stop: int, path: epath.Path) -> None:
        neighbours = find_neighbours(_documents(records, start, stop), encoder, index, bank_vectors, multimodal,
                                     options, in_bank=in_bank)
        save_arrays(path, array=neighbours.astype(np.int64))

    paths = _chunked("neighbours", folder, split, len(records), chunk_size, "npy", compute)
    out = neighbours_file(folder.parent, split)
    if jax.process_index() == 0:
        save_arrays(out, array=np.concatenate([load_arrays(p) for p in paths]))
    _sync(f"neighbours-{split}.npy")
    return out


def retriever_figures(records: Sequence[bytes], encoder: Encoder, bank_records: Sequence[bytes],
                      neighbours: np.ndarray, limit: int = 10_000) -> dict:
    """On the first `limit` documents of a split with a caption and an image: caption -> image top-1 among them;
    with labels, the share whose top image / first neighbour has the caption's label, and the chance of that."""
    documents = _documents(records, 0, min(len(records), limit))
    pairs = [(i, d, part_queries(i, d)) for i, d in documents]
    pairs = [(i, d, qs) for i, d, qs in pairs if len(qs) == 2]
    if not pairs:
        return {}
    text = encoder([qs[0] for _, _, qs in pairs])
    image = encoder([qs[1] for _, _, qs in pairs])
    top = np.argmax(text @ image.T, axis=1)
    figures = {"eval_documents": len(pairs), "caption_to_image_top1": float(np.mean(top == np.arange(len(pairs))))}
    labels = np.array([decode_document_record(records[i])[1].get("label", -1) for i, _, _ in pairs])
    if np.all(labels >= 0):
        figures["caption_to_image_same_label"] = float(np.mean(labels[top] == labels))
        figures["same_label_chance"] = float(np.sum((np.bincount(labels) / len(labels)) ** 2))
        first = neighbours[[i for i, _, _ in pairs], 0]
        found = first >= 0
        neighbour_labels = np.array([decode_document_record(bank_records[j])[1].get("label", -1)
                                     for j in first[found]])
        figures["first_neighbour_same_label"] = float(np.mean(neighbour_labels == labels[found]))
    return figures
