"""The 8-device mesh (data=2, fsdp=2, tensor=2) computes what one device computes."""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from helpers import train_steps

# Float32 reductions run in a different order when split over devices; after two AdamW steps parameters agree to
# within 1e-4 absolute (learning rate 3e-3), losses and gradient norms to 1e-5 relative.
PARAM_ATOL = 1e-4


def test_sharded_training_matches_one_device(tiny_config):
    one_params, one_history, _ = train_steps(tiny_config, jax.devices()[:1], 2)
    tiny_config.mesh.ici.update(data=2, fsdp=2, tensor=2)
    mesh_params, mesh_history, shardings = train_steps(tiny_config, jax.devices(), 2)

    for a, b in zip(one_history, mesh_history):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), one_params, mesh_params)

    # Parameters and optimizer moments really are split as the logical rules say.
    layer_query = shardings.params["layers"]["attention"]["query"]
    assert layer_query.spec == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, kv)
    assert shardings.params["lm_head"].spec == P("fsdp", "tensor")
    adam = shardings.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    assert adam.mu["lm_head"].spec == P("fsdp", "tensor")
