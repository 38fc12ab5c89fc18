"""train/optim.py: the learning-rate schedule, the weight-decay mask and the optimizer built from config.optim."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.config import base_config
from cm3jax.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def _optim(**values):
    optim = base_config().optim
    optim.update(**{"peak_lr": 1.0, "end_lr_ratio": 0.1, "warmup_steps": 10, **values})
    return optim


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_schedule_warms_up_linearly_then_decays_to_the_end_ratio(decay):
    schedule = learning_rate_schedule(_optim(decay=decay), total_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], rtol=1e-6)
    end = {"linear": 0.1, "cosine": 0.1, "constant": 1.0}[decay]
    np.testing.assert_allclose(schedule(110), end, rtol=1e-5)
    middle = {"linear": 0.55, "cosine": 0.1 + 0.9 * 0.5, "constant": 1.0}[decay]
    np.testing.assert_allclose(schedule(60), middle, rtol=1e-5)


def test_warmup_longer_than_the_run_is_cut_to_the_run():
    schedule = learning_rate_schedule(_optim(decay="linear", warmup_steps=1000), total_steps=20)
    np.testing.assert_allclose(schedule(20), 1.0, rtol=1e-6)


def test_weight_decay_mask_leaves_out_matching_paths():
    params = {"embed": {"position_embedding": jnp.ones(2)}, "layers": {"mlp": {"kernel": jnp.ones(2)}}}
    mask = weight_decay_mask(params, ["position_embedding"])
    assert mask == {"embed": {"position_embedding": False}, "layers": {"mlp": {"kernel": True}}}


def test_optimizer_clips_by_global_norm_and_decays_only_masked_weights():
    optim = _optim(decay="constant", warmup_steps=0, weight_decay=0.5, clip_norm=1.0,
                   no_weight_decay=("position_embedding",))
    optimizer, _ = make_optimizer(optim, total_steps=10)
    params = {"position_embedding": jnp.full(3, 2.0), "kernel": jnp.full(3, 2.0)}
    grads = {"position_embedding": jnp.zeros(3), "kernel": jnp.zeros(3)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["position_embedding"], 0.0)  # no gradient, no decay
    np.testing.assert_allclose(updates["kernel"], -1.0 * 0.5 * 2.0)  # lr * weight_decay * w
    huge = jax.tree.map(lambda g: g + 1e6, grads)
    clipped, _ = make_optimizer(_optim(decay="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0), 10)
    unclipped, _ = make_optimizer(_optim(decay="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0.0), 10)
    first, _ = clipped.update(huge, clipped.init(params), params)
    second, _ = unclipped.update(huge, unclipped.init(params), params)
    # Adam normalises the step size, so clipping shows in the second moment: both give ~ -lr on the first step.
    np.testing.assert_allclose(first["kernel"], second["kernel"], rtol=1e-3)


def test_the_vqgan_optimizer_keeps_the_state_layout_and_steps_of_its_earlier_hand_built_one():
    """vqgan.optim through make_optimizer: the state has the (clip or identity, AdamW) layout that earlier VQ-GAN
    checkpoints hold, and the same updates as taming's constant-LR Adam built by hand."""
    import optax

    from configs import tiny

    config = tiny.get_config()
    optimizer, _ = make_optimizer(config.vqgan.optim, int(config.vqgan.train.steps))
    v = config.vqgan.optim
    by_hand = optax.chain(optax.identity(), optax.adamw(optax.constant_schedule(v.peak_lr), b1=v.b1, b2=v.b2,
                                                        weight_decay=v.weight_decay))
    params = {"decoder": {"kernel": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    state, expected_state = optimizer.init(params), by_hand.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
        expected, expected_state = by_hand.update(grads, expected_state, params)
        np.testing.assert_allclose(updates["decoder"]["kernel"], expected["decoder"]["kernel"], rtol=1e-6)
