"""Dead-code restarts: usage averages and which codes move where."""
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.train.codebook import restart_dead_codes, update_code_usage


def test_usage_is_relative_to_uniform_and_ignores_padding_images():
    codes = jnp.array([[0, 0, 1, 1], [2, 2, 2, 2]])  # image 1 is padding
    usage = update_code_usage(jnp.zeros(4), codes, jnp.array([1.0, 0.0]), decay=0.0)
    np.testing.assert_allclose(usage, [2.0, 2.0, 0.0, 0.0])  # half the positions each, uniform share is a quarter
    decayed = update_code_usage(usage, codes, jnp.array([1.0, 0.0]), decay=0.5)
    np.testing.assert_allclose(decayed, [2.0, 2.0, 0.0, 0.0])
    halved = update_code_usage(usage, jnp.full((2, 4), 3), jnp.ones(2), decay=0.5)
    np.testing.assert_allclose(halved, [1.0, 1.0, 0.0, 2.0])


def test_dead_codes_move_onto_valid_latents_and_live_codes_stay():
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    usage = jnp.asarray([0.0, 0.5, 0.01, 2.0] * 4)
    latents = jnp.asarray(rng.normal(size=(3, 2, 2, 3)), jnp.float32)
    weights = jnp.array([1.0, 0.0, 1.0])  # image 1 is padding: its latents must never be drawn
    new_codebook, new_usage, restarted = restart_dead_codes(codebook, usage, latents, weights, jax.random.key(0),
                                                             threshold=0.03)
    dead = np.asarray(usage) < 0.03
    assert int(restarted) == dead.sum() == 8
    np.testing.assert_array_equal(np.asarray(new_codebook)[~dead], np.asarray(codebook)[~dead])
    np.testing.assert_array_equal(np.asarray(new_usage)[dead], 1.0)
    np.testing.assert_array_equal(np.asarray(new_usage)[~dead], np.asarray(usage)[~dead])
    valid_latents = np.asarray(latents)[[0, 2]].reshape(-1, 3)
    for row in np.asarray(new_codebook)[dead]:
        assert np.any(np.all(valid_latents == row, axis=1)), row


def test_a_batch_of_padding_restarts_nothing():
    codebook = jnp.ones((4, 2))
    new_codebook, usage, restarted = restart_dead_codes(codebook, jnp.zeros(4), jnp.zeros((2, 2, 2, 2)),
                                                        jnp.zeros(2), jax.random.key(0), threshold=0.5)
    assert int(restarted) == 0
    np.testing.assert_array_equal(new_codebook, codebook)
    np.testing.assert_array_equal(usage, 0.0)
