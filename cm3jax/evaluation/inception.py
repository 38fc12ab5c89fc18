"""FID's InceptionV3 in Flax: the 2048-d pool features of the network FID is defined with (TF's 2015-12-05
Inception graph, as pytorch-fid ports it), from weights the user provides.

No package here ships those weights. Provide them as an .npz of pytorch-fid's state dict (names as in its
FIDInceptionA/C/E modules), written once where torch and pytorch-fid are installed:

    import numpy as np, torch
    state = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
    np.savez("fid_inception_v3.npz", **{k: v.numpy() for k, v in state.items()})

and set eval.inception_weights=fid_inception_v3.npz.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.errors import BadInputError, MissingInputError

INPUT_SIZE = 299
FEATURES = 2048
HOW_TO_PROVIDE = ("an .npz of pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-6726825d.pth): "
                  "np.savez(PATH, **{k: v.numpy() for k, v in torch.load(PTH, weights_only=True).items()}); see "
                  "cm3jax/evaluation/inception.py")


class BasicConv(nn.Module):
    """Convolution without bias, batch norm (inference statistics, eps 1e-3), ReLU."""
    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, (self.strides, self.strides),
                    padding=[(self.padding[0],) * 2, (self.padding[1],) * 2], use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average over the in-image neighbours only (count_include_pad=False)."""
    sums = nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=True) * 9
    counts = nn.avg_pool(jnp.ones_like(x[:1, ..., :1]), (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                         count_include_pad=True) * 9
    return sums / counts


def _max_pool_3x3(x, strides: int = 2, padding: int = 0):
    return nn.max_pool(x, (3, 3), (strides, strides), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """The last two blocks; FID's graph pools by average in the first (Mixed_7b) and by max in the second."""
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, strides=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[n, 299, 299, 3] pixels in [-1, 1] -> [n, 2048] pool features."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.cache
def _abstract_variables() -> dict:
    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))


# Flax leaf (collection, name) <- pytorch-fid state-dict suffix.
_LEAVES = {("params", "kernel"): "conv.weight", ("params", "scale"): "bn.weight", ("params", "bias"): "bn.bias",
           ("batch_stats", "mean"): "bn.running_mean", ("batch_stats", "var"): "bn.running_var"}


def torch_name(collection: str, path: Sequence[str]) -> str:
    """The pytorch-fid state-dict key of one Flax leaf (path: module names, then the leaf's name)."""
    *modules, leaf = path
    modules = [m for m in modules if m not in ("conv", "bn")]
    return ".".join(modules + [_LEAVES[(collection, leaf)]])


def variables_from_state_dict(state: dict[str, np.ndarray], source: str = "the weights") -> dict:
    """Flax variables from pytorch-fid's state dict: conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; keys the
    features do not use (the 1008-way classifier, batch counters) are ignored."""
    def leaf(path, abstract, collection):
        names = [p.key for p in path]
        key = torch_name(collection, names)
        if key not in state:
            raise BadInputError(f"{source} has no {key!r}: expected {HOW_TO_PROVIDE}")
        value = np.asarray(state[key], np.float32)
        if names[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != abstract.shape:
            raise BadInputError(f"{source}: {key!r} has shape {value.shape}, the FID Inception needs "
                                f"{abstract.shape}")
        return jnp.asarray(value)

    abstract = _abstract_variables()
    return {collection: jax.tree_util.tree_map_with_path(functools.partial(leaf, collection=collection),
                                                         abstract[collection])
            for collection in ("params", "batch_stats")}


@functools.lru_cache(maxsize=1)
def load_inception(path: str) -> dict:
    """The FID Inception's variables from the user's .npz (see the module docstring)."""
    from etils import epath

    if not path or not epath.Path(path).exists():
        raise MissingInputError(f"eval.inception_weights={path!r}: no such file; provide {HOW_TO_PROVIDE}")
    try:
        with epath.Path(path).open("rb") as f, np.load(f) as npz:
            state = {key: npz[key] for key in npz.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise BadInputError(f"cannot read {path} as an .npz ({e}); provide {HOW_TO_PROVIDE}") from e
    return variables_from_state_dict(state, path)


@jax.jit
def _features(variables: dict, images: jax.Array) -> jax.Array:
    pixels = images.astype(jnp.float32) / 127.5 - 1.0
    pixels = jax.image.resize(pixels, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return FIDInceptionV3().apply(variables, pixels)


def inception_features(variables: dict, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 [n, h, w, 3] -> float64 [n, 2048]: resized (bilinear) to 299x299, scaled to [-1, 1]."""
    chunks = [np.asarray(_features(variables, jnp.asarray(images[i:i + batch_size])), np.float64)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, FEATURES))
