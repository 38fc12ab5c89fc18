"""Shared test helpers: run the LM train step directly on a mesh, outside the loop."""
import flax.linen as nn
import jax

from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import global_batch, logical_axis_rules
from cm3jax.train import loop
from cm3jax.train.lm import build_lm_task


def train_steps(config, devices, num_steps):
    """Initialises the LM on a mesh over `devices` and runs `num_steps` train steps.

    Returns (params on host, list of per-step metrics on host, state shardings)."""
    mesh = create_mesh(config, devices)
    task, _ = build_lm_task(config, mesh)
    rules = logical_axis_rules(config)
    _, shardings = loop.abstract_state_and_shardings(task.init_state, mesh, rules)
    state = loop.initialize_state(task.init_state, jax.random.key(config.train.seed), mesh, rules, shardings)
    history = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = loop.jit_train_step(task, mesh, shardings)
        for _ in range(num_steps):
            batch = global_batch(next(task.train_data), mesh, task.global_batch_size)
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history, shardings
