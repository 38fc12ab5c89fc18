"""CM3leon at the paper's sizes (Table 3): `--config=configs/cm3leon.py:350m` (or `760m`, `7b`).

All sizes: sequence 4096, 8M-token batches (2048 x 4096), 1500 warm-up steps. Our choices where the paper is silent:
heads of width 64 (128 for 7B), FFN 4 x d_model with ReLU (OPT), AdamW b1=0.9 b2=0.98 eps=1e-8 (CM3 / RA-CM3), weight
decay 0.1, clip 1.0, linear decay to 10% (metaseq's polynomial decay).

    launch/tpu.sh --name=cm3leon-350m --accelerator=v5p-128 -- \
        cm3jax train --config=configs/cm3leon.py:350m --workdir=gs://BUCKET/cm3leon_350m
    launch/gpu.sh -- cm3jax train --config=configs/cm3leon.py:350m --workdir=runs/cm3leon_350m \
        --config.train.global_batch_size=64   # one host: fewer sequences, same recipe otherwise
"""
from cm3jax.config import base_config
from cm3jax.config_validation import ConfigError

# size: (layers, d_model, heads, peak learning rate)
SIZES = {
    "350m": (24, 1024, 16, 6e-4),
    "760m": (24, 1536, 16, 5e-4),
    "7b": (32, 4096, 32, 1.2e-4),
}


def get_config(arg=None):
    if arg not in SIZES:
        raise ConfigError(f"configs/cm3leon.py needs a size, one of {', '.join(SIZES)} (e.g. "
                          f"--config=configs/cm3leon.py:350m), got {arg!r}")
    layers, d_model, heads, peak_lr = SIZES[arg]
    c = base_config()
    c.model.update(num_layers=layers, d_model=d_model, num_heads=heads, max_seq_len=4096, remat_policy="full")
    c.train.update(global_batch_size=2048, seq_len=4096, steps=300_000)
    c.optim.update(peak_lr=peak_lr, warmup_steps=1500)
    return c
