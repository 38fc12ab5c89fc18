"""The LM objective: loss weights, text/image split, z-loss, and gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax import vocab
from cm3jax.train.lm import loss_sums, means_from_sums

from helpers import train_steps


def _batch(rng, shape=(2, 6), vocab_size=11):
    targets = rng.integers(0, vocab_size, shape)
    return {
        "targets": jnp.asarray(targets),
        "loss_weights": jnp.asarray(rng.integers(0, 2, shape).astype(np.float32)),
        "modality": jnp.asarray(rng.integers(0, 3, shape)),
    }


def test_loss_is_weighted_cross_entropy_split_by_modality():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)).astype(np.float32))
    batch = _batch(rng)
    objective, sums = loss_sums(logits, batch, z_loss_weight=0.0)
    log_probs = jax.nn.log_softmax(logits)
    ce = -np.take_along_axis(np.asarray(log_probs), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    w = np.asarray(batch["loss_weights"])
    np.testing.assert_allclose(objective, (w * ce).sum(), rtol=1e-6)
    means = means_from_sums(sums)
    np.testing.assert_allclose(means["loss"], (w * ce).sum() / w.sum(), rtol=1e-6)
    image = w * (np.asarray(batch["modality"]) == vocab.MODALITY_IMAGE)
    np.testing.assert_allclose(means["image_loss"], (image * ce).sum() / image.sum(), rtol=1e-6)
    text = w * (np.asarray(batch["modality"]) == vocab.MODALITY_TEXT)
    np.testing.assert_allclose(means["text_loss"], (text * ce).sum() / text.sum(), rtol=1e-6)


def test_zero_weight_tokens_do_not_affect_the_loss_or_its_gradient():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)).astype(np.float32))
    batch = _batch(rng)
    other = dict(batch, targets=jnp.where(batch["loss_weights"] > 0, batch["targets"], 0))
    grad = jax.grad(lambda x, b: loss_sums(x, b, 1e-4)[0])
    np.testing.assert_allclose(loss_sums(logits, batch, 1e-4)[0], loss_sums(logits, other, 1e-4)[0], rtol=1e-6)
    g = grad(logits, batch)
    assert not np.any(np.asarray(g)[np.asarray(batch["loss_weights"]) == 0])


def test_z_loss_adds_weighted_log_z_squared():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)).astype(np.float32)) + 3.0
    batch = _batch(rng)
    without, sums = loss_sums(logits, batch, 0.0)
    with_z, _ = loss_sums(logits, batch, 0.5)
    log_z = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(with_z - without, 0.5 * (batch["loss_weights"] * log_z ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["z_loss"], (batch["loss_weights"] * log_z ** 2).sum(), rtol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_config):
    import jax as _jax

    device = _jax.devices()[:1]
    full_params, full_history, _ = train_steps(tiny_config, device, 2)
    tiny_config.train.grad_accum_steps = 4
    accum_params, accum_history, _ = train_steps(tiny_config, device, 2)
    for a, b in zip(full_history, accum_history):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), full_params, accum_params)
