"""The VQ-GAN: shapes, code range, straight-through gradients, learning, the adaptive GAN weight, and its trainer
stage."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm3jax.data.sources import SkipCounts, open_raw_source, read_examples
from cm3jax.models.vqgan import VQGAN, PatchDiscriminator, VQGANConfig, pixels_from_uint8
from cm3jax.train.vqgan import VQGANTrainOptions, VQGANTrainState, load_lpips, make_vqgan_steps, train_vqgan

from helpers import copy_run

SMALL = VQGANConfig(image_size=32, channels=16, channel_multipliers=(1, 2, 2, 2), num_res_blocks=1,
                    attention_at_lowest=True, z_channels=32, codebook_size=32, code_dim=8)


@functools.cache
def _jitted_init(module):
    return jax.jit(module.init)


def init_params(module, seed: int):
    """`module`'s parameters (a VQGAN or its PatchDiscriminator), from one jitted init per module config: parameters
    depend on the key and the image size alone, so the tests share the compiled program."""
    size = module.config.image_size
    return _jitted_init(module)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]


@pytest.fixture
def digits_dir(tiny_vqgan_run):
    return str(tiny_vqgan_run / "data")


def digit_images(data_dir, n):
    from cm3jax.config import base_config

    source = open_raw_source(base_config().raw_data, "train", data_dir)
    examples = list(read_examples(source, 32, SkipCounts(), range(n)))
    return jnp.asarray(pixels_from_uint8(np.stack([e.image for e in examples])))


@pytest.mark.slow
def test_encode_decode_shapes_and_code_range():
    model = VQGAN(SMALL)
    images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
    params = init_params(model, 1)
    codes = model.apply({"params": params}, images, method=model.encode)
    assert codes.shape == (3, 4, 4) and codes.dtype == jnp.int32 and SMALL.tokens_per_image == 16
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.codebook_size
    decoded = model.apply({"params": params}, codes, method=model.decode)
    assert decoded.shape == (3, 32, 32, 3)
    reconstructions, same_codes, _, latents = model.apply({"params": params}, images)
    np.testing.assert_array_equal(same_codes, codes)
    np.testing.assert_allclose(reconstructions, decoded, atol=1e-5)  # decode(codes) is the forward's output
    np.testing.assert_allclose(jnp.linalg.norm(latents, axis=-1), 1.0, rtol=1e-5)  # l2-normalised, code_dim wide
    assert latents.shape == (3, 4, 4, SMALL.code_dim)


def test_the_patch_encoder_codes_each_patch_from_its_own_pixels():
    """vqgan.encoder=patch: a patch's latent (hence its code) is the same whatever surrounds it and wherever it is;
    the conv encoder's is not (receptive field, image-wide GroupNorm)."""
    patch = dataclasses.replace(SMALL, encoder="patch")
    images = np.array(jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1))
    images[1, :8, :8] = images[0, 24:, 8:16]  # one 8x8 patch of image 0, elsewhere in image 1
    latents = {}
    for name, config in (("patch", patch), ("conv", SMALL)):
        model = VQGAN(config)
        params = init_params(model, 1)
        latents[name] = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images))[3])
    np.testing.assert_allclose(latents["patch"][1, 0, 0], latents["patch"][0, 3, 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(latents["conv"][1, 0, 0], latents["conv"][0, 3, 1], atol=1e-3)


def test_the_patch_decoder_draws_each_patch_from_its_own_code():
    """vqgan.decoder=patch: changing one code changes its own f x f pixels and nothing else, and equal codes draw equal
    patches anywhere; the conv decoder's change spreads to the neighbours."""
    patch = dataclasses.replace(SMALL, encoder="patch", decoder="patch")
    codes = np.array(jax.random.randint(jax.random.key(2), (1, 4, 4), 0, SMALL.codebook_size))
    assert codes[0, 3, 0] != codes[0, 0, 0]  # the second change below is a change
    changed = codes.copy()
    changed[0, 1, 2] = (codes[0, 1, 2] + 1) % SMALL.codebook_size
    changed[0, 3, 0] = codes[0, 0, 0]
    drawn = {}
    for name, config in (("patch", patch), ("conv", SMALL)):
        model = VQGAN(config)
        params = init_params(model, 1)
        decode = jax.jit(functools.partial(model.apply, method=model.decode))
        drawn[name] = [np.asarray(decode({"params": params}, jnp.asarray(c)))[0] for c in (codes, changed)]
    before, after = drawn["patch"]
    assert before.shape == (32, 32, 3)
    differs = np.abs(after - before).max(axis=-1) > 1e-6
    expected = np.zeros((32, 32), bool)
    expected[8:16, 16:24] = expected[24:, :8] = True
    np.testing.assert_array_equal(differs, expected)
    np.testing.assert_allclose(after[24:, :8], before[:8, :8], rtol=1e-5, atol=1e-6)
    conv_before, conv_after = drawn["conv"]
    assert np.abs(conv_after - conv_before)[:8, 16:24].max() > 1e-4  # the patch above the changed code's


def test_a_checkpoint_of_another_decoder_is_refused_naming_the_field(tiny_config):
    """A checkpoint saved before vqgan.decoder existed has the conv decoder: resuming it with the conv decoder is
    accepted, with the patch decoder refused naming the field (not read as a damaged checkpoint)."""
    from cm3jax.config import config_to_json
    from cm3jax.train.checkpoint import state_differences
    from cm3jax.train.vqgan import VQGAN_STATE_FIELDS

    saved = json.loads(config_to_json(tiny_config))
    del saved["vqgan"]["decoder"]
    assert state_differences(tiny_config, saved, VQGAN_STATE_FIELDS) == ""
    patch = tiny_config.copy_and_resolve_references()
    patch.vqgan.decoder = "patch"
    assert state_differences(patch, saved, VQGAN_STATE_FIELDS) == (
        "config.vqgan.decoder='patch' but 'conv' in the checkpoint")


@pytest.mark.slow
def test_straight_through_gradients_reach_the_encoder():
    model = VQGAN(SMALL)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    params = init_params(model, 1)

    def reconstruction_only(p):  # no codebook/commitment term: only the straight-through path can reach the encoder
        return jnp.mean(jnp.square(model.apply({"params": p}, images)[0] - images))

    grads = jax.jit(jax.grad(reconstruction_only))(params)
    for name in ("to_code", "Conv_0"):
        assert float(jnp.abs(grads["encoder"][name]["kernel"]).max()) > 0


@pytest.mark.slow
def test_training_raises_psnr_and_uses_the_codebook(digits_dir):
    images = digit_images(digits_dir, 16)
    options = VQGANTrainOptions(reconstruction="l2", lpips_weight=0.0, gan_weight=0.0, disc_start=10**9)
    optimizer = optax.adam(3e-3)
    lpips_model, lpips_params = load_lpips("alexnet")
    train_step, eval_step = make_vqgan_steps(SMALL, options, lpips_model, optimizer)
    model = VQGAN(SMALL)
    params = {"vqgan": init_params(model, 0),
              "discriminator": init_params(PatchDiscriminator(SMALL), 1)}
    state = VQGANTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            code_usage=jnp.zeros(SMALL.codebook_size))
    batch = {"images": images, "valid": jnp.ones(16)}
    step = jax.jit(train_step)
    first = None
    for _ in range(100):
        state, metrics = step(state, batch, lpips_params)
        first = first if first is not None else float(metrics["psnr"])
    sums = jax.jit(eval_step)(state, batch, lpips_params)
    final_psnr = float(sums["psnr_sum"] / sums["images"])
    usage = float(jnp.mean(sums["code_counts"] > 0))
    assert final_psnr > first + 6.0, (first, final_psnr)
    assert usage >= 0.5, usage  # 256 code slots over a 32-code codebook


@pytest.mark.slow
def test_vqgan_stage_trains_resumes_and_saves_reconstructions(tiny_config, tiny_vqgan_run, tmp_path):
    trained_workdir = copy_run(tiny_vqgan_run, tmp_path / "run")
    tmp_path = trained_workdir / "vqgan"  # trained to step 2 on two devices (data parallel)
    tiny_config.vqgan.train.steps = 4  # resumes from step 2; the GAN switches on at step 2
    result = train_vqgan(tiny_config, str(tmp_path), str(trained_workdir / "data"), jax.devices()[:2])
    assert result.step == 4
    records = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["discriminator_loss"] > 0 and train[0]["discriminator_loss"] == 0
    evals = [r for r in records if r["split"] == "eval"]
    assert {"psnr", "lpips", "codebook_usage", "code_perplexity"} <= set(evals[-1])
    assert os.path.exists(tmp_path / "samples" / "reconstructions_0000004.png")


@pytest.mark.slow
def test_adaptive_gan_weight_is_the_gradient_norm_ratio_at_the_last_decoder_layer(digits_dir):
    images = digit_images(digits_dir, 4)
    options = VQGANTrainOptions(reconstruction="l1", lpips_weight=0.0, gan_weight=0.5, disc_start=0,
                                adaptive_gan_weight=True, dead_code_threshold=0.0)
    optimizer = optax.sgd(0.0)
    lpips_model, lpips_params = load_lpips("alexnet")
    train_step, _ = make_vqgan_steps(SMALL, options, lpips_model, optimizer)
    model, discriminator = VQGAN(SMALL), PatchDiscriminator(SMALL)
    params = {"vqgan": init_params(model, 0),
              "discriminator": init_params(discriminator, 1)}
    state = VQGANTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            code_usage=jnp.ones(SMALL.codebook_size))
    _, metrics = jax.jit(train_step)(state, {"images": images, "valid": jnp.ones(4)}, lpips_params)

    def last_layer_grad(objective):
        return jax.jit(jax.grad(objective))(params["vqgan"])["decoder"]["to_image"]["kernel"]

    def reconstruction(p):
        out = model.apply({"params": p}, images)
        return jnp.mean(jnp.abs(out.reconstructions - images)) + out.quantizer_loss

    def adversarial(p):
        fake = model.apply({"params": p}, images).reconstructions
        return -jnp.mean(discriminator.apply({"params": params["discriminator"]}, fake))

    expected = 0.5 * jnp.linalg.norm(last_layer_grad(reconstruction)) / (
        jnp.linalg.norm(last_layer_grad(adversarial)) + 1e-4)
    np.testing.assert_allclose(float(metrics["gan_weight"]), float(expected), rtol=1e-4)
    assert float(metrics["gan_weight"]) != 0.5  # not the fixed weight


def test_a_run_that_ends_before_disc_start_skips_the_discriminator_with_the_same_updates():
    """With disc_start beyond the run every discriminator term is multiplied by 0, so not running it (the step the
    stage compiles then) gives the same parameters and losses; images under 32 pixels get an LPIPS (repeated up)."""
    config = VQGANConfig(image_size=16, channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                         attention_at_lowest=False, z_channels=8, codebook_size=16, code_dim=4, disc_channels=8,
                         disc_layers=2)
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    params = {"vqgan": init_params(VQGAN(config), 1),
              "discriminator": init_params(PatchDiscriminator(config), 2)}
    optimizer = optax.adam(1e-3)
    lpips_model, lpips_params = load_lpips("alexnet")
    results = []
    for runs in (True, False):
        options = VQGANTrainOptions(reconstruction="l1", lpips_weight=0.5, disc_start=10**9, discriminator_runs=runs)
        train_step, eval_step = make_vqgan_steps(config, options, lpips_model, optimizer)
        state = VQGANTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                                code_usage=jnp.ones(config.codebook_size))
        for _ in range(2):
            state, metrics = jax.jit(train_step)(state, {"images": images, "valid": jnp.ones(4)}, lpips_params)
        sums = jax.jit(eval_step)(state, {"images": images, "valid": jnp.ones(4)}, lpips_params)
        results.append((state.params, metrics, sums))
    (with_params, with_metrics, with_sums), (without_params, without_metrics, without_sums) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), with_params, without_params)
    for key in ("loss", "reconstruction_loss", "lpips", "vq_loss", "psnr"):
        np.testing.assert_allclose(with_metrics[key], without_metrics[key], rtol=1e-5)
    assert float(without_metrics["lpips"]) > 0 and float(without_sums["lpips_sum"]) > 0
    assert float(without_metrics["adversarial_loss"]) == 0.0 and float(without_metrics["discriminator_loss"]) == 0.0
