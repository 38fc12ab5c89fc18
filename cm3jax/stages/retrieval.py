"""`cm3jax retrieve`: train the dual-encoder retriever, index the train documents, and write every document's
neighbours (DIR/retrieval; resumable). The steps are in cm3jax/retrieval/build.py."""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from cm3jax.stages.stage import Stage
from cm3jax.workdir import StageDir, Workdir


def build_retrieval(config: ml_collections.ConfigDict, workdir: Workdir) -> dict:
    """Builds DIR/retrieval for the LM's train and eval splits; returns the summary ({"preempted": True} when the
    retriever's training was preempted)."""
    from cm3jax import vocab as vocab_lib
    from cm3jax.data.shards import open_token_shards
    from cm3jax.models.retriever import RetrieverConfig
    from cm3jax.retrieval.build import (
        compute_neighbours,
        derived_parts_identity,
        discard_outdated_parts,
        embed_bank,
        open_or_build_index,
        retriever_figures,
    )
    from cm3jax.retrieval.embeddings import PrecomputedEncoder, RetrieverEncoder
    from cm3jax.retrieval.index import IndexOptions
    from cm3jax.retrieval.neighbours import StrategyOptions
    from cm3jax.storage import arrays_digest, load_arrays
    from cm3jax.train.retriever import host_params, train_retriever

    config = workdir.resolve(config)
    r = config.retrieval
    token_dir = config.data.token_dir
    stage_dir = workdir.retrieval
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    vocab_lib.require_saved_vocab(vocab, token_dir)
    # Bank, index and neighbours of one folder come from one set of token shards, also across interrupted runs.
    inputs = {"tokens": StageDir.at(token_dir).identity()}
    stage_dir.check_inputs(inputs)
    stage_dir.record_inputs(inputs)
    train_split, eval_split = config.data.train_split, config.data.eval_split
    splits = {split: open_token_shards(token_dir, split) for split in dict.fromkeys((train_split, eval_split))}
    bank = splits[train_split]
    chunk_size = int(r.chunk_size)
    summary: dict = {"bank_documents": len(bank)}

    if r.embeddings:
        encoders = {split: PrecomputedEncoder(r.embeddings, split, len(records)) for split, records in splits.items()}
        encoder_identity = arrays_digest([encoder.vectors for encoder in encoders.values()])
        summary["embeddings"] = r.embeddings
    else:
        result = train_retriever(config, str(stage_dir.retriever), token_dir)
        if result.preempted:
            return {"preempted": True}
        params = host_params(result.state.params)
        trained = RetrieverEncoder(params, RetrieverConfig.from_config(config), vocab,
                                   int(config.retriever.embed_batch_size))
        encoders = dict.fromkeys(splits, trained)
        encoder_identity = arrays_digest(params)
        summary["retriever_step"] = result.step

    index_options, options = IndexOptions.from_config(r), StrategyOptions.from_config(r)
    removed = discard_outdated_parts(stage_dir, derived_parts_identity(encoder_identity, chunk_size, index_options,
                                                                       options))
    if removed:
        print(f"retrieval: {', '.join(removed)} were made with another encoder or other settings: rebuilding",
              flush=True)
    bank_vectors, multimodal = embed_bank(bank, encoders[train_split], stage_dir.bank, chunk_size)
    index = open_or_build_index(stage_dir.index, bank_vectors, index_options)
    summary.update(index=type(index).__name__, multimodal_share=float(np.mean(multimodal)))
    for split, records in splits.items():
        path = compute_neighbours(records, split, split == train_split, encoders[split], index, bank_vectors,
                                  multimodal, options, stage_dir.neighbour_chunks, chunk_size)
        neighbours = load_arrays(path)
        summary[f"{split}_with_neighbours"] = float(np.mean(neighbours[:, 0] >= 0))
        if split == eval_split:
            summary.update(retriever_figures(records, encoders[split], bank, neighbours))
    return summary


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    config = workdir.resolve(config)
    stage_dir = workdir.retrieval.create()
    summary = build_retrieval(config, workdir)
    if summary.get("preempted"):
        return False
    stage_dir.mark_complete(config, summary)
    print(f"retrieval: {json.dumps(summary)}; neighbours in {stage_dir}", flush=True)
    return True


def _skipped_because(config: ml_collections.ConfigDict) -> str | None:
    return "data.retrieval='none'" if config.data.retrieval == "none" else None


def validate(config: ml_collections.ConfigDict) -> None:
    from cm3jax.config_validation import validate_retrieval_config

    validate_retrieval_config(config)


STAGE = Stage(name="retrieval", command="retrieve", run=run, validate=validate, needs=("tokens",),
              config_fields=("retrieval", "retriever"), resumable=("retriever.train.steps",),
              skipped_because=_skipped_because,
              summary="train the dual-encoder retriever, index the train documents, write every document's "
                      "neighbours (DIR/retrieval; resumable)")
