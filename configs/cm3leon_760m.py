"""CM3leon-760M (paper Table 3): 24 layers, d_model 1536, peak LR 5e-4, sequence 4096, 8M-token batches (2048 x 4096),
1500 warmup steps. Our choices where the paper is silent: 16 heads, FFN 4 x d_model with ReLU (OPT), AdamW b1=0.9
b2=0.98 eps=1e-8 (CM3 / RA-CM3), weight decay 0.1, clip 1.0, linear decay to 10% (metaseq's polynomial decay).

    launch/tpu.sh --name=cm3leon-760m --accelerator=v5p-128 -- \
        cm3jax train --config=configs/cm3leon_760m.py --workdir=gs://BUCKET/cm3leon_760m
    launch/gpu.sh -- cm3jax train --config=configs/cm3leon_760m.py --workdir=runs/cm3leon_760m \
        --config.train.global_batch_size=64   # one host: fewer sequences, same recipe otherwise
"""
from cm3jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.model.update(num_layers=24, d_model=1536, num_heads=16, max_seq_len=4096, remat_policy="full")
    c.train.update(global_batch_size=2048, seq_len=4096, steps=300_000)
    c.optim.update(peak_lr=5e-4, warmup_steps=1500)
    return c
