"""The decoder: causality, packing, KV cache, initialisation, and depth-independent compilation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.models.transformer import (
    CM3LeonDecoder,
    DecoderConfig,
    decoding_params,
    flops_per_token,
    image_grid_index,
)

CFG = DecoderConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, head_dim=8, ffn_dim=64, max_seq_len=64)


def _params(cfg=CFG, seed=0, perturb=True):
    """Initialised params; output projections start at 0 (identity blocks), so tests perturb them to see mixing."""
    params = nn.unbox(CM3LeonDecoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    if perturb:
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return params


def _tokens(shape, seed=2):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


@pytest.mark.parametrize("activation,qk_norm,tie",
                         [("relu", False, False), ("swiglu", True, True), ("gelu", False, True)])
def test_future_tokens_never_change_earlier_logits(activation, qk_norm, tie):
    cfg = DecoderConfig(**{**CFG.__dict__, "activation": activation, "qk_norm": qk_norm, "tie_embeddings": tie})
    model, params = CM3LeonDecoder(cfg), _params(cfg)
    tokens = _tokens((2, 16))
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % cfg.vocab_size)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3  # the change is visible where it should be


def test_packed_documents_do_not_attend_to_each_other():
    model, params = CM3LeonDecoder(CFG), _params()
    segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
    positions = jnp.array([list(range(6)) + list(range(7)) + [0] * 3])
    tokens = _tokens((1, 16))
    packed = model.apply({"params": params}, tokens, positions, segments)
    # The second document alone (positions restart at 0) gives the same logits as inside the pack.
    alone = model.apply({"params": params}, tokens[:, 6:13])
    np.testing.assert_allclose(packed[:, 6:13], alone, atol=2e-5)
    # Changing the first document changes nothing in the second.
    other_first = tokens.at[:, :6].set((tokens[:, :6] + 3) % CFG.vocab_size)
    repacked = model.apply({"params": params}, other_first, positions, segments)
    np.testing.assert_array_equal(packed[:, 6:13], repacked[:, 6:13])


def test_kv_cache_decoding_matches_full_forward():
    model, params = CM3LeonDecoder(CFG), _params()
    tokens = _tokens((2, 20))
    full = model.apply({"params": params}, tokens)
    decoder = CM3LeonDecoder(CFG, decode=True)
    cache = decoder.init(jax.random.key(0), jnp.zeros((2, 24), jnp.int32))["cache"]
    step = jax.jit(lambda p, c, t, prefill=False: decoder.apply(
        {"params": decoding_params(p, CFG.num_layers), "cache": c}, t, prefill=prefill, mutable=["cache"]),
                   static_argnames="prefill")
    logits, mutated = step(params, cache, tokens[:, :7], prefill=True)
    pieces = [logits]
    # Several tokens against a filled cache (a prompt continued) are also exact.
    logits, mutated = step(params, mutated["cache"], tokens[:, 7:10])
    pieces.append(logits)
    for i in range(10, 20):
        logits, mutated = step(params, mutated["cache"], tokens[:, i:i + 1])
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_initialisation_follows_the_paper():
    cfg = DecoderConfig(**{**CFG.__dict__, "d_model": 256, "num_heads": 4, "head_dim": 64, "ffn_dim": 1024,
                           "vocab_size": 512, "max_seq_len": 256})
    params = _params(cfg, perturb=False)
    query = np.asarray(params["layers"]["attention"]["query"])
    assert abs(query.std() - 0.006) < 0.0003
    assert np.abs(query).max() <= 3 * 0.006 + 1e-6  # truncated at 3 sigma
    position = np.asarray(params["position_embedding"])
    assert abs(position.std() - 0.0002) < 0.00002
    assert not np.any(params["layers"]["attention"]["out"])
    assert not np.any(params["layers"]["mlp"]["wo"])
    # No biases and no LayerNorm parameters anywhere.
    names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names == {"layers/attention/query", "layers/attention/key", "layers/attention/value",
                     "layers/attention/out", "layers/mlp/wi", "layers/mlp/wo", "token_embedding",
                     "position_embedding", "lm_head"}


def test_layers_are_stacked_and_compilation_does_not_grow_with_depth():
    def hlo_size(num_layers):
        cfg = DecoderConfig(**{**CFG.__dict__, "num_layers": num_layers})
        model = CM3LeonDecoder(cfg)
        params = _params(cfg, perturb=False)
        assert params["layers"]["mlp"]["wi"].shape[0] == num_layers
        lowered = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, jnp.zeros((1, 8), jnp.int32))
        return lowered.as_text().count("\n")  # number of ops; shapes differ only in their leading dim

    assert hlo_size(2) == hlo_size(12)


def test_unrolled_layer_scan_keeps_the_parameters_and_the_results():
    """model.scan_unroll changes how the layers run, not what they are: same parameter tree, same logits, same grads."""
    unrolled = DecoderConfig(**{**CFG.__dict__, "scan_unroll": CFG.num_layers})
    params = _params()
    assert jax.tree.structure(params) == jax.tree.structure(_params(unrolled))
    tokens = _tokens((2, 16))

    def loss_and_grads(cfg):
        return jax.value_and_grad(lambda p: CM3LeonDecoder(cfg).apply({"params": p}, tokens).std())(params)

    (loss, grads), (loss_unrolled, grads_unrolled) = loss_and_grads(CFG), loss_and_grads(unrolled)
    np.testing.assert_allclose(loss_unrolled, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_unrolled), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_flops_formula_counts_matmuls_and_attention():
    cfg = DecoderConfig(vocab_size=1000, num_layers=3, d_model=64, num_heads=4, head_dim=16, ffn_dim=256,
                        max_seq_len=128)
    matmul = 3 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 1000
    assert flops_per_token(cfg, 128) == 6 * matmul + 12 * 3 * 128 * 64


def test_image_grid_index_counts_codes_within_each_run():
    """Each image code's raster index in its image; text restarts the count; a run already begun before the first
    token (a decoding step) goes on from there."""
    is_image = jnp.array([[0, 1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 0]], bool)
    index = np.asarray(image_grid_index(is_image, jnp.array([0, 5])))
    np.testing.assert_array_equal(np.where(np.asarray(is_image), index, -1),
                                  [[-1, 0, 1, 2, -1, -1, 0, 1], [5, 6, -1, 0, 1, 2, 3, -1]])

