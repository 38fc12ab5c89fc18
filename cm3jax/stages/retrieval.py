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
    from cm3jax.retrieval.build import compute_neighbours, embed_bank, open_or_build_index, retriever_figures
    from cm3jax.retrieval.embeddings import PrecomputedEncoder, RetrieverEncoder
    from cm3jax.retrieval.index import IndexOptions
    from cm3jax.retrieval.neighbours import StrategyOptions
    from cm3jax.storage import load_arrays
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
    bank = open_token_shards(token_dir, train_split)
    chunk_size = int(r.chunk_size)
    summary: dict = {"bank_documents": len(bank)}

    if r.embeddings:
        def encoder_for(split: str, count: int):
            return PrecomputedEncoder(r.embeddings, split, count)
        summary["embeddings"] = r.embeddings
    else:
        result = train_retriever(config, str(stage_dir.retriever), token_dir)
        if result.preempted:
            return {"preempted": True}
        trained = RetrieverEncoder(host_params(result.state.params), RetrieverConfig.from_config(config), vocab,
                                   int(config.retriever.embed_batch_size))
        summary["retriever_step"] = result.step

        def encoder_for(split: str, count: int):
            return trained

    bank_vectors, multimodal = embed_bank(bank, encoder_for(train_split, len(bank)), stage_dir.bank, chunk_size)
    index = open_or_build_index(stage_dir.index, bank_vectors, IndexOptions.from_config(r))
    options = StrategyOptions.from_config(r)
    summary.update(index=type(index).__name__, multimodal_share=float(np.mean(multimodal)))
    for split in dict.fromkeys((train_split, eval_split)):
        records = bank if split == train_split else open_token_shards(token_dir, split)
        encoder = encoder_for(split, len(records))
        path = compute_neighbours(records, split, split == train_split, encoder, index, bank_vectors, multimodal,
                                  options, stage_dir.neighbour_chunks, chunk_size)
        neighbours = load_arrays(path)
        summary[f"{split}_with_neighbours"] = float(np.mean(neighbours[:, 0] >= 0))
        if split == eval_split:
            summary.update(retriever_figures(records, encoder, bank, neighbours))
    return summary


def run(config: ml_collections.ConfigDict, workdir: Workdir) -> bool:
    stage_dir = workdir.retrieval.prepare(workdir.resolve(config))
    summary = build_retrieval(config, workdir)
    if summary.get("preempted"):
        return False
    stage_dir.mark_complete(summary)
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
