"""Checks that a config can run before any compilation starts; every error names the offending field."""
from __future__ import annotations

import math

import ml_collections

from cm3jax.errors import UserError

ACTIVATIONS = ("relu", "gelu", "swiglu")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LR_DECAYS = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("token_shards", "synthetic")
PACKINGS = ("first_fit", "pad")
MIN_TEXT_VOCAB = 320
RECONSTRUCTION_LOSSES = ("l1", "l2")
LPIPS_NETS = ("vgg16", "alexnet")
VQGAN_ENCODERS = ("conv", "patch")
VQGAN_DECODERS = ("conv", "patch")
INDEX_KINDS = ("auto", "exact", "scann")
RETRIEVAL_MODES = ("none", "neighbours")
CAPTION_STYLES = ("auto", "infill", "continue", "instruction")
RAW_DATASETS = ("digits", "shapes", "tfds", "array_record", "image_folder")
TEXT_MODEL_TYPES = ("unigram", "bpe")


class ConfigError(UserError, ValueError):
    """A config value that cannot run; the message starts with the field name."""


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def require_checkpoint_step(value: int, field: str) -> None:
    require(int(value) >= -1, field, f"must be a checkpoint step or -1 (the latest), got {value}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1,
                    num_processes: int = 1) -> None:
    """Raises ConfigError naming the field when the config cannot run on `num_devices` devices."""
    validate_model_and_train_config(config)
    m, t = config.model, config.train
    from cm3jax.parallel.mesh import resolve_mesh_shape

    ici, dcn = resolve_mesh_shape(config, num_devices, num_slices)
    batch_shards = ici["data"] * ici["fsdp"] * dcn["data"] * dcn["fsdp"]
    micro_batch = t.global_batch_size // t.grad_accum_steps
    require(micro_batch % batch_shards == 0, "train.global_batch_size",
            f"micro-batch {micro_batch} (global_batch_size / grad_accum_steps) is not divisible by the "
            f"{batch_shards} data-parallel shards (mesh data x fsdp)")
    tensor = ici["tensor"] * dcn["tensor"]
    require(m.num_heads % tensor == 0, "mesh.ici.tensor",
            f"tensor parallelism {tensor} does not divide model.num_heads={m.num_heads}")
    validate_data_config(config, num_processes)


def validate_model_and_train_config(config: ml_collections.ConfigDict) -> None:
    """The LM's model, train and optim sections on their own (what needs no devices)."""
    m, t, o = config.model, config.train, config.optim
    for field in ("num_layers", "d_model", "num_heads", "max_seq_len"):
        require(int(m[field]) >= 1, f"model.{field}", f"must be >= 1, got {m[field]}")
    require(m.head_dim == -1 or m.head_dim >= 1, "model.head_dim", f"must be >= 1 or -1, got {m.head_dim}")
    require(m.ffn_dim == -1 or m.ffn_dim >= 1, "model.ffn_dim", f"must be >= 1 or -1, got {m.ffn_dim}")
    if m.head_dim == -1:
        require(m.d_model % m.num_heads == 0, "model.num_heads",
                f"{m.num_heads} heads do not divide d_model={m.d_model} (or set model.head_dim)")
    require(m.activation in ACTIVATIONS, "model.activation", f"{m.activation!r} not in {ACTIVATIONS}")
    require_checkpoint_step(t.init_step, "train.init_step")
    require(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
            f"{m.attention!r} not in {ATTENTION_IMPLEMENTATIONS}")
    require(m.attention_block_size >= 1, "model.attention_block_size", f"must be >= 1, got {m.attention_block_size}")
    require(1 <= m.scan_unroll <= m.num_layers, "model.scan_unroll",
            f"must be between 1 and num_layers={m.num_layers}, got {m.scan_unroll}")
    require(m.remat_policy in REMAT_POLICIES, "model.remat_policy", f"{m.remat_policy!r} not in {REMAT_POLICIES}")
    require(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} not in {DTYPES}")
    require(m.compute_dtype in DTYPES + ("auto",), "model.compute_dtype", f"{m.compute_dtype!r} not valid")

    require(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    require(t.seq_len <= m.max_seq_len, "train.seq_len",
            f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len} (the learned position table)")
    validate_loop_settings(t, "train")
    require(int(t.grad_accum_steps) >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    require(t.global_batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
            f"{t.grad_accum_steps} does not divide train.global_batch_size={t.global_batch_size}")
    validate_optim(o, "optim")


def validate_loop_settings(t: ml_collections.ConfigDict, name: str) -> None:
    """A training loop's section (`train`, `vqgan.train`, `retriever.train`), named `name` in the errors."""
    for field in ("global_batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        require(int(t[field]) >= 1, f"{name}.{field}", f"must be >= 1, got {t[field]}")
    require(int(t.eval_every) >= 0, f"{name}.eval_every", "must be >= 0 (0 disables evaluation)")
    require_checkpoint_step(t.restore_step, f"{name}.restore_step")


def validate_optim(o: ml_collections.ConfigDict, name: str) -> None:
    """An optim-shaped section (`optim`, `retriever.optim`, `vqgan.optim`), named `name` in the errors."""
    require(o.peak_lr > 0, f"{name}.peak_lr", f"must be > 0, got {o.peak_lr}")
    require(o.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
    require(o.decay in LR_DECAYS, f"{name}.decay", f"{o.decay!r} not in {LR_DECAYS}")
    require(0.0 <= o.end_lr_ratio <= 1.0, f"{name}.end_lr_ratio", "must be in [0, 1]")
    require(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, f"{name}.b1", "Adam betas must be in [0, 1)")
    require(o.clip_norm >= 0, f"{name}.clip_norm", "must be >= 0 (0 disables clipping)")


def validate_vocab_config(config: ml_collections.ConfigDict) -> None:
    v = config.vocab
    require(v.text_size >= MIN_TEXT_VOCAB, "vocab.text_size",
            f"must be >= {MIN_TEXT_VOCAB}: the byte-fallback SentencePiece tokenizer needs 256 byte pieces, <unk> and "
            f"the corpus's characters, got {v.text_size}")


def validate_data_config(config: ml_collections.ConfigDict, num_processes: int) -> None:
    d, t, v = config.data, config.train, config.vocab
    validate_vocab_config(config)
    require(d.source in DATA_SOURCES, "data.source", f"{d.source!r} not in {DATA_SOURCES}")
    require(d.packing in PACKINGS, "data.packing", f"{d.packing!r} not in {PACKINGS}")
    require(0.0 <= d.image_first_probability <= 1.0, "data.image_first_probability", "must be in [0, 1]")
    require(0.0 <= d.cm3_whole_text_probability <= 1.0, "data.cm3_whole_text_probability", "must be in [0, 1]")
    require(d.cm3_poisson_lambda >= 0, "data.cm3_poisson_lambda", f"must be >= 0, got {d.cm3_poisson_lambda}")
    require(0 <= d.cm3_min_spans <= d.cm3_max_spans, "data.cm3_min_spans",
            f"need 0 <= cm3_min_spans <= cm3_max_spans, got {d.cm3_min_spans} and {d.cm3_max_spans}")
    require(d.cm3_max_spans <= v.num_masks, "data.cm3_max_spans",
            f"{d.cm3_max_spans} spans need as many <mask:i> tokens, but vocab.num_masks={v.num_masks}")
    require(t.seq_len > 3 * d.cm3_max_spans + 2, "data.cm3_max_spans",
            f"{d.cm3_max_spans} spans add up to {3 * d.cm3_max_spans} tokens: too many for train.seq_len={t.seq_len}")
    for field in ("num_workers", "packing_bins", "synthetic_records", "worker_buffer_size"):
        require(int(d[field]) >= 0, f"data.{field}", f"must be >= 0, got {d[field]}")
    require(d.num_streams == -1 or d.num_streams >= 1, "data.num_streams", f"must be >= 1 or -1, got {d.num_streams}")
    from cm3jax.data.pipeline import resolve_num_streams

    streams = resolve_num_streams(d, num_processes)
    require(t.global_batch_size % streams == 0, "data.num_streams",
            f"{streams} streams do not divide train.global_batch_size={t.global_batch_size}")
    require(streams % num_processes == 0, "data.num_streams",
            f"{streams} streams cannot be split evenly over {num_processes} processes")
    require(d.retrieval in RETRIEVAL_MODES, "data.retrieval", f"{d.retrieval!r} not in {RETRIEVAL_MODES}")
    probs = [float(p) for p in d.num_retrieved_probs]
    require(all(p >= 0 for p in probs) and abs(sum(probs) - 1) < 1e-6, "data.num_retrieved_probs",
            f"must be probabilities of K = 0, 1, ... summing to 1, got {probs}")
    require(d.eval_num_retrieved >= 0, "data.eval_num_retrieved", f"must be >= 0, got {d.eval_num_retrieved}")
    require(d.retrieved_loss_weight >= 0, "data.retrieved_loss_weight", f"must be >= 0, got {d.retrieved_loss_weight}")


def validate_raw_data_config(config: ml_collections.ConfigDict) -> None:
    require(config.raw_data.dataset in RAW_DATASETS, "raw_data.dataset",
            f"{config.raw_data.dataset!r} not in {RAW_DATASETS}")
    require(config.raw_data.image_size >= 8, "raw_data.image_size", f"must be >= 8, got {config.raw_data.image_size}")


def validate_tokenize_config(config: ml_collections.ConfigDict) -> None:
    k = config.tokenize
    for field in ("batch_size", "shard_size"):
        require(int(k[field]) >= 1, f"tokenize.{field}", f"must be >= 1, got {k[field]}")
    require(k.text_model_type in TEXT_MODEL_TYPES, "tokenize.text_model_type",
            f"{k.text_model_type!r} not in {TEXT_MODEL_TYPES}")
    require(len(k.splits) >= 1, "tokenize.splits", "must name at least one split")


def validate_generate_config(config: ml_collections.ConfigDict) -> None:
    g = config.generate
    for field in ("temperature", "top_p", "cfg_scale", "cdk_alpha", "image_scale", "text_scale"):
        require(math.isfinite(float(g[field])), f"generate.{field}", f"must be a finite number, got {g[field]}")
    require(g.temperature >= 0, "generate.temperature", f"must be >= 0 (0: greedy), got {g.temperature}")
    require(g.top_k >= 0, "generate.top_k", f"must be >= 0 (0: off), got {g.top_k}")
    require(0 < g.top_p <= 1, "generate.top_p", f"must be in (0, 1], got {g.top_p}")
    from cm3jax.inference.decode import GUIDANCE_STREAMS

    require(g.guidance in GUIDANCE_STREAMS, "generate.guidance", f"{g.guidance!r} not in {tuple(GUIDANCE_STREAMS)}")
    require(0 < g.cdk_alpha <= 1 and g.cdk_k >= 1, "generate.cdk_alpha",
            f"need 0 < cdk_alpha <= 1 and cdk_k >= 1, got {g.cdk_alpha} and {g.cdk_k}")
    require(g.caption_style in CAPTION_STYLES, "generate.caption_style",
            f"{g.caption_style!r} not in {CAPTION_STYLES}")
    for field in ("num", "max_text_tokens"):
        require(int(g[field]) >= 1, f"generate.{field}", f"must be >= 1, got {g[field]}")
    for field in ("retrieve", "rerank_candidates", "sample_captions"):
        require(int(g[field]) >= 0, f"generate.{field}", f"must be >= 0, got {g[field]}")


def validate_retrieval_config(config: ml_collections.ConfigDict) -> None:
    r, q = config.retrieval, config.retriever
    require(r.index_kind in INDEX_KINDS, "retrieval.index_kind", f"{r.index_kind!r} not in {INDEX_KINDS}")
    require(r.num_neighbours >= 1, "retrieval.num_neighbours", f"must be >= 1, got {r.num_neighbours}")
    require(r.candidates >= r.num_neighbours, "retrieval.candidates",
            f"{r.candidates} candidates cannot give retrieval.num_neighbours={r.num_neighbours} neighbours")
    require(len(config.data.num_retrieved_probs) - 1 <= r.num_neighbours, "data.num_retrieved_probs",
            f"allows K up to {len(config.data.num_retrieved_probs) - 1} but retrieval.num_neighbours="
            f"{r.num_neighbours}")
    require(-1.0 < r.duplicate_threshold <= 1.0, "retrieval.duplicate_threshold",
            f"must be a cosine similarity in (-1, 1], got {r.duplicate_threshold}")
    require(0.0 <= r.query_dropout < 1.0, "retrieval.query_dropout", f"must be in [0, 1), got {r.query_dropout}")
    require(r.chunk_size >= 1, "retrieval.chunk_size", f"must be >= 1, got {r.chunk_size}")
    require(r.index_training_threads >= 0, "retrieval.index_training_threads",
            f"must be >= 0 (0: every core), got {r.index_training_threads}")
    require(r.seed >= 0, "retrieval.seed", f"must be >= 0, got {r.seed}")
    require(not r.embeddings or ("{split}" in r.embeddings and "{part}" in r.embeddings), "retrieval.embeddings",
            f"must be a path with {{split}} and {{part}} (e.g. /data/clip/{{split}}-{{part}}.npy), got "
            f"{r.embeddings!r}")
    for field in ("embed_dim", "text_len", "num_layers", "d_model", "num_heads", "embed_batch_size"):
        require(int(q[field]) >= 1, f"retriever.{field}", f"must be >= 1, got {q[field]}")
    require(q.d_model % q.num_heads == 0, "retriever.num_heads",
            f"{q.num_heads} heads do not divide retriever.d_model={q.d_model}")
    require(q.temperature_init > 0 and q.max_logit_scale > 0, "retriever.temperature_init",
            "temperature_init and max_logit_scale must be > 0")
    require(q.compute_dtype in DTYPES + ("auto",), "retriever.compute_dtype", f"{q.compute_dtype!r} not valid")
    validate_optim(q.optim, "retriever.optim")
    validate_loop_settings(q.train, "retriever.train")


def validate_vqgan_config(config: ml_collections.ConfigDict) -> None:
    v = config.vqgan
    factor = 2 ** (len(v.channel_multipliers) - 1)
    require(v.image_size >= 16, "vqgan.image_size", f"must be >= 16, got {v.image_size}")
    require(v.image_size % factor == 0, "vqgan.channel_multipliers",
            f"{len(v.channel_multipliers)} resolutions downsample by {factor}, which does not divide "
            f"vqgan.image_size={v.image_size}")
    require(v.reconstruction_loss in RECONSTRUCTION_LOSSES, "vqgan.reconstruction_loss",
            f"{v.reconstruction_loss!r} not in {RECONSTRUCTION_LOSSES}")
    require(v.lpips_net in LPIPS_NETS, "vqgan.lpips_net", f"{v.lpips_net!r} not in {LPIPS_NETS}")
    require(v.encoder in VQGAN_ENCODERS, "vqgan.encoder", f"{v.encoder!r} not in {VQGAN_ENCODERS}")
    require(v.decoder in VQGAN_DECODERS, "vqgan.decoder", f"{v.decoder!r} not in {VQGAN_DECODERS}")
    require(v.code_dim >= 1 and v.channels >= 4, "vqgan.code_dim", "code_dim must be >= 1 and channels >= 4")
    require(0 <= v.dead_code_threshold < 1, "vqgan.dead_code_threshold",
            f"must be in [0, 1) (a share of uniform code use; 0 disables restarts), got {v.dead_code_threshold}")
    require(0 <= v.code_usage_decay < 1, "vqgan.code_usage_decay",
            f"must be in [0, 1), got {v.code_usage_decay}")
    validate_optim(v.optim, "vqgan.optim")
    validate_loop_settings(v.train, "vqgan.train")


def validate_sft_config(config: ml_collections.ConfigDict) -> None:
    from cm3jax.data.sft import LOSS_ON, TASKS

    s = config.sft
    require(int(s.steps) >= 0, "sft.steps", f"must be >= 0, got {s.steps}")
    require(float(s.peak_lr) > 0, "sft.peak_lr", f"must be > 0, got {s.peak_lr}")
    require(int(s.warmup_steps) >= 0, "sft.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    require_checkpoint_step(s.init_step, "sft.init_step")
    require(s.loss_on in LOSS_ON, "sft.loss_on", f"{s.loss_on!r} not in {LOSS_ON}")
    require(0.0 <= float(s.condition_dropout) < 1.0, "sft.condition_dropout",
            f"must be in [0, 1), got {s.condition_dropout}")
    require(0.0 <= float(s.image_first_probability) <= 1.0, "sft.image_first_probability",
            f"must be in [0, 1], got {s.image_first_probability}")
    require(1 <= int(s.vqa_pairs) <= int(config.vocab.num_masks), "sft.vqa_pairs",
            f"must be in [1, vocab.num_masks={config.vocab.num_masks}] (each infilled answer takes a <mask:i>), "
            f"got {s.vqa_pairs}")
    unknown = sorted(set(s.mixture) - set(TASKS))
    require(not unknown, "sft.mixture", f"{unknown} not in {TASKS}")
    weights = [float(w) for w in s.mixture.values()]
    require(all(w >= 0 for w in weights) and sum(weights) > 0, "sft.mixture",
            f"task weights must be >= 0 and not all 0, got {dict(s.mixture)}")
    require(config.data.source == "token_shards", "data.source",
            f"SFT builds its examples from token shards: it needs data.source='token_shards' (got "
            f"{config.data.source!r})")
    from cm3jax.models.vqgan import VQGANConfig

    codes = VQGANConfig.from_config(config).tokens_per_image
    images = 2 if any(float(s.mixture.get(task, 0)) > 0 for task in ("edit", "structure")) else 1
    # Two images, their <break>s, one token of each text segment and the two <eos> (data/sft.py: shortest_length).
    needed = images * codes + 7
    require(int(config.train.seq_len) + 1 >= needed, "train.seq_len",
            f"SFT examples of the mixture hold {images} image(s) of {codes} codes: they need train.seq_len >= "
            f"{needed - 1}, got {config.train.seq_len}")
