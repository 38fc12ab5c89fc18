"""CPU demo: the whole pipeline on a 2-core machine in minutes (`make demo`).

    cm3jax pipeline --config=configs/demo.py --workdir=workdir/demo

The `data` stage builds the embedded `digits` dataset (DIR/data). Until the tokenizers land, the LM trains on synthetic
caption-image token documents (cm3jax/data/synthetic.py) through the real pipeline (CM3 masking, packing); the
vocabulary already has the demo's shape: a small text vocabulary and a 512-code image codebook with 64 codes per image.
"""
from cm3jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.vocab.update(text_size=1024, image_codebook_size=512, num_masks=16)
    c.model.update(num_layers=4, d_model=256, num_heads=4, max_seq_len=256, remat_policy="none")
    c.data.update(source="synthetic", synthetic_text_len=12, synthetic_image_tokens=64, synthetic_text_pieces=200)
    # Digits at 32x32, f=4: 8x8 = 64 codes per image from the 512-code codebook.
    c.raw_data.update(dataset="digits", image_size=32)
    c.vqgan.update(image_size=32, channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, z_channels=64,
                   lpips_net="alexnet", learning_rate=3e-4, disc_start=100_000)
    c.vqgan.train.update(global_batch_size=32, steps=200, log_every=50, eval_every=100, eval_batches=4,
                         checkpoint_every=100, keep_checkpoints=1)
    c.train.update(global_batch_size=16, seq_len=256, steps=200, log_every=25, eval_every=100, eval_batches=4,
                   checkpoint_every=100, keep_checkpoints=2)
    c.optim.update(peak_lr=2e-3, warmup_steps=20, decay="cosine")
    return c
