"""The shapes recipe: scenes of 1-3 coloured shapes whose ground truth makes every evaluation exact.

    cm3jax pipeline --config=configs/shapes.py --workdir=workdir/shapes
    cm3jax pipeline --config=configs/shapes.py:smoke --workdir=/tmp/shapes_smoke   # every stage shrunk

Scenes are rendered at 32x32 (the size the models see, so no resize blurs them); the VQ-GAN turns them into 8x8 = 64
codes (f=4) from a 512-code codebook, enough for every colour, kind, size and cell to survive tokenization
(evaluation/shapes_parser.py reads them back).
"""
from cm3jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.vocab.update(text_size=512, image_codebook_size=512, num_masks=16)
    c.model.update(num_layers=4, d_model=256, num_heads=4, max_seq_len=384, remat_policy="none", scan_unroll=4)
    c.runtime.retain_freed_host_memory = True
    c.raw_data.update(dataset="shapes", image_size=32, shapes_image_size=32, shapes_train_size=10000)
    c.vqgan.update(image_size=32, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, z_channels=64,
                   lpips_net="alexnet", disc_start=100_000, code_usage_decay=0.9)
    c.vqgan.optim.peak_lr = 3e-4
    c.vqgan.train.update(global_batch_size=32, steps=400, log_every=50, eval_every=200, eval_batches=4,
                         checkpoint_every=200, keep_checkpoints=1)
    c.tokenize.update(batch_size=64, shard_size=2000)
    c.retriever.update(embed_dim=128, text_len=40, num_layers=2, d_model=128, num_heads=4, embed_batch_size=128)
    c.retriever.optim.update(peak_lr=1e-3, warmup_steps=30)
    c.retriever.train.update(global_batch_size=64, steps=300, log_every=50, eval_every=150, eval_batches=3,
                             checkpoint_every=150, keep_checkpoints=1)
    c.retrieval.update(chunk_size=2000)
    c.data.update(retrieval="neighbours", cm3_whole_text_probability=0.2)
    c.generate.update(temperature=0.3, cfg_scale=1.5, num=4, sample_captions=8,
                      sample_prompts=("a large red circle in the center",
                                      "a small blue square in the top left and a large yellow triangle at the bottom"))
    c.train.update(global_batch_size=16, seq_len=384, steps=1500, log_every=50, eval_every=250, eval_batches=4,
                   checkpoint_every=250, keep_checkpoints=2)
    c.optim.update(peak_lr=2e-3, warmup_steps=20, decay="cosine")
    return c
