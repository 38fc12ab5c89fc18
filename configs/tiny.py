"""Tiny model for tests: compiles in seconds on CPU.

    cm3jax train --config=configs/tiny.py --workdir=/tmp/cm3jax_tiny
"""
from cm3jax.config import base_config
from cm3jax.config_validation import ConfigError


def get_config(arg=None):
    if arg is not None:
        raise ConfigError(f"configs/tiny.py takes no argument (--config=configs/tiny.py), got {arg!r}")
    c = base_config()
    c.vocab.text_size = 384  # byte-fallback SentencePiece: 256 byte pieces, <unk> and the corpus characters
    c.vocab.image_codebook_size = 64
    c.vocab.num_masks = 8
    c.model.update(num_layers=2, d_model=32, num_heads=4, max_seq_len=64, remat_policy="none")
    c.data.update(source="synthetic", synthetic_records=256, synthetic_text_len=6, synthetic_image_tokens=8,
                  synthetic_text_pieces=40, cm3_max_spans=4)
    c.train.update(global_batch_size=8, seq_len=32, steps=6, log_every=1, eval_every=0, eval_batches=2,
                   checkpoint_every=3, keep_checkpoints=3, async_checkpointing=False)
    c.optim.update(peak_lr=3e-3, warmup_steps=2)
    c.runtime.retain_freed_host_memory = True  # the CPU setting, so the CLI tests run with it
    c.raw_data.update(dataset="digits", image_size=32)
    c.vqgan.update(image_size=32, channels=8, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1, z_channels=16,
                   attention_at_lowest=False, disc_channels=8, disc_layers=2, lpips_net="alexnet", disc_start=2)
    c.vqgan.optim.peak_lr = 1e-3
    c.vqgan.train.update(global_batch_size=8, steps=4, log_every=1, eval_every=4, eval_batches=1, checkpoint_every=2,
                         keep_checkpoints=2)
    c.retriever.update(embed_dim=16, text_len=12, num_layers=1, d_model=32, num_heads=4, embed_batch_size=16)
    c.retriever.optim.update(peak_lr=3e-3, warmup_steps=2)
    c.retriever.train.update(global_batch_size=8, steps=4, log_every=1, eval_every=4, eval_batches=1,
                             checkpoint_every=2, keep_checkpoints=2)
    c.retrieval.update(chunk_size=64)
    c.eval.update(num_examples=4, batch_size=4, loss_batches=1, guidance=("cfg",), sheet_images=4)
    c.sft.update(steps=0, warmup_steps=1)  # no SFT in pipelines; tests that fine-tune set sft.steps
    c.mesh.ici.update(data=1, fsdp=-1, tensor=1)
    return c
