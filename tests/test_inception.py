"""FID's InceptionV3 (cm3jax/evaluation/inception.py): pytorch-fid's state-dict names and layouts map onto the Flax
model, bad weight files get clear errors, and the features are 2048-d and independent of the batch."""
import numpy as np
import pytest

from cm3jax.errors import BadInputError, MissingInputError
from cm3jax.evaluation import inception

from helpers import random_state_dict


def test_pytorch_fid_names_and_layouts_map_onto_the_flax_model():
    assert inception.torch_name("params", ["Mixed_7c", "branch3x3dbl_3a", "conv", "kernel"]) == \
        "Mixed_7c.branch3x3dbl_3a.conv.weight"
    assert inception.torch_name("batch_stats", ["Conv2d_1a_3x3", "bn", "var"]) == "Conv2d_1a_3x3.bn.running_var"
    state = random_state_dict()
    variables = inception.variables_from_state_dict(state)
    kernel = np.asarray(variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
    torch_weight = state["Mixed_6b.branch7x7_2.conv.weight"]  # a 1x7 convolution: [out, in, 1, 7]
    assert torch_weight.shape == (128, 128, 1, 7) and kernel.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(kernel[0, 5, 3, 9], torch_weight[9, 3, 0, 5])
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]["mean"],
                                  state["Mixed_5b.branch_pool.bn.running_mean"])


def test_bad_weight_files_say_what_to_provide(tmp_path):
    with pytest.raises(MissingInputError, match="pytorch-fid"):
        inception.load_inception(str(tmp_path / "missing.npz"))
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(BadInputError, match="cannot read"):
        inception.load_inception(str(tmp_path / "text.npz"))
    state = random_state_dict()
    del state["Mixed_6e.branch_pool.conv.weight"]
    with pytest.raises(BadInputError, match="Mixed_6e.branch_pool.conv.weight"):
        inception.variables_from_state_dict(state)
    state = random_state_dict()
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"][:16]
    with pytest.raises(BadInputError, match="shape"):
        inception.variables_from_state_dict(state)


@pytest.mark.slow
def test_features_are_2048_d_and_do_not_depend_on_the_batch(tmp_path):
    np.savez(tmp_path / "weights.npz", **random_state_dict())
    variables = inception.load_inception(str(tmp_path / "weights.npz"))
    ramp = np.linspace(0, 255, 32)
    images = np.stack([np.zeros((32, 32, 3)), np.broadcast_to(ramp[:, None, None], (32, 32, 3)),
                       np.broadcast_to(ramp[None, :, None], (32, 32, 3))]).astype(np.uint8)
    together = inception.inception_features(variables, images)
    alone = inception.inception_features(variables, images[1:2])
    assert together.shape == (3, inception.FEATURES) and np.isfinite(together).all()
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-4, atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 1e-2 * np.abs(together[1]).max()  # other images, other features
