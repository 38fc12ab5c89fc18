"""CPU demo: the whole pipeline on a 2-core machine in minutes (`make demo`).

    cm3jax pipeline --config=configs/demo.py --workdir=workdir/demo

Stages: `data` builds the embedded `digits` dataset (DIR/data); `vqgan` trains the image tokenizer (32x32 -> 8x8 = 64
codes from a 512-code codebook); `tokens` trains the SentencePiece text tokenizer (at most 1,024 pieces) and writes
the token shards; `retrieval` trains the dual-encoder retriever, indexes the train documents and finds every
document's neighbours; `lm` trains the CM3leon LM on them with 0-2 retrieved documents before each (CM3 masking,
packing); `eval` scores the LM on held-out digits (docs/evaluation.md); `samples` draws four digits of every class
with classifier-free guidance and captions held-out digits.

`--config=configs/demo.py:smoke` shrinks every stage (models, steps, examples) so that the whole pipeline runs in a few
minutes: a first look at the stages and their outputs, not a model worth sampling.
"""
from cm3jax.config import base_config
from cm3jax.config_validation import ConfigError

RECIPE_ARGS = (None, "smoke")


def get_config(arg=None):
    check_recipe_arg("demo", arg)
    c = base_config()
    c.vocab.update(text_size=1024, image_codebook_size=512, num_masks=16)
    # CPU training settings: no remat, no layer loop, freed host memory kept (README, Performance: about 15% shorter
    # LM steps than scan_unroll=1 without retained memory, the same losses).
    c.model.update(num_layers=4, d_model=256, num_heads=4, max_seq_len=256, remat_policy="none", scan_unroll=4)
    c.runtime.retain_freed_host_memory = True
    # Digits at 32x32, f=4: 8x8 = 64 codes per image from the 512-code codebook.
    c.raw_data.update(dataset="digits", image_size=32)
    c.vqgan.update(image_size=32, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, z_channels=64,
                   lpips_net="alexnet", disc_start=100_000,
                   code_usage_decay=0.9)  # 200 steps: a dead code is restarted within ~30 steps
    c.vqgan.optim.peak_lr = 3e-4
    c.vqgan.train.update(global_batch_size=32, steps=200, log_every=50, eval_every=100, eval_batches=4,
                         checkpoint_every=100, keep_checkpoints=1)
    c.tokenize.update(batch_size=64, shard_size=1000)
    c.retriever.update(embed_dim=128, text_len=32, num_layers=2, d_model=128, num_heads=4, embed_batch_size=128)
    c.retriever.optim.update(peak_lr=1e-3, warmup_steps=30)
    c.retriever.train.update(global_batch_size=64, steps=300, log_every=50, eval_every=150, eval_batches=3,
                             checkpoint_every=150, keep_checkpoints=1)
    # Our retriever puts same-digit documents at median cosine 0.95 (50 distinct captions), so CLIP's 0.9 near-copy
    # threshold would leave most documents without neighbours; 0.98 still drops the near-copies.
    c.retrieval.update(chunk_size=500, duplicate_threshold=0.98)
    # Every fifth caption masked whole: captioning by infilling and the unconditional stream of CFG see their exact
    # prompt form in training (cm3jax/data/cm3.py; README, Performance).
    c.data.update(retrieval="neighbours", cm3_whole_text_probability=0.2)
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    # The 4M-parameter demo LM draws its best digits at a low temperature and mild guidance (README, Performance).
    c.generate.update(temperature=0.3, cfg_scale=1.5, num=4, sample_captions=8,
                      sample_prompts=tuple(f"a handwritten {name}" for name in digits))
    c.train.update(global_batch_size=16, seq_len=256, steps=1500, log_every=50, eval_every=250, eval_batches=4,
                   checkpoint_every=250, keep_checkpoints=2)
    c.optim.update(peak_lr=2e-3, warmup_steps=20, decay="cosine")
    c.sft.steps = 0  # the digits demo is pretraining only
    if arg == "smoke":
        shrink_to_smoke(c)
    return c


def check_recipe_arg(recipe: str, arg) -> None:
    if arg not in RECIPE_ARGS:
        raise ConfigError(f"configs/{recipe}.py takes no argument or `:smoke` "
                          f"(--config=configs/{recipe}.py:smoke), got {arg!r}")


def shrink_to_smoke(c) -> None:
    """Every stage of a recipe at test size: models that compile in seconds, tens of steps, a few eval examples and
    samples. The data, vocabulary and stage order stay the recipe's."""
    c.vqgan.update(channels=8, z_channels=16, attention_at_lowest=False, disc_channels=8, disc_layers=2)
    c.vqgan.train.update(steps=20, log_every=10, eval_every=20, eval_batches=1, checkpoint_every=20)
    c.retriever.update(embed_dim=32, num_layers=1, d_model=32)
    c.retriever.optim.warmup_steps = 5
    c.retriever.train.update(steps=20, log_every=10, eval_every=20, eval_batches=1, checkpoint_every=20)
    c.model.update(num_layers=2, d_model=64, num_heads=4, scan_unroll=1)
    c.optim.warmup_steps = 5
    c.train.update(steps=30, log_every=10, eval_every=30, eval_batches=1, checkpoint_every=30, keep_checkpoints=1)
    if c.sft.steps:
        c.sft.update(steps=20, warmup_steps=5)
    c.eval.update(num_examples=8, batch_size=8, loss_batches=2, sheet_images=8)
    c.generate.update(num=1, sample_captions=2, sample_prompts=c.generate.sample_prompts[:2])
