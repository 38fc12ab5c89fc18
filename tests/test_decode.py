"""Decoding: KV-cache steps against full recomputes, guidance and filters on crafted logits, modality constraints,
seeding, left padding, and sharded decoding against one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.inference import processors
from cm3jax.inference.decode import (
    FREE,
    GREEDY,
    SAMPLE_IMAGE,
    SamplingOptions,
    Schedule,
    decode,
    left_pad,
    make_decoder,
)
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig

VOCAB = vocab_lib.UnifiedVocab(text_size=40, image_codebook_size=16, num_masks=4, pad_to_multiple=8)
CFG = DecoderConfig(vocab_size=VOCAB.padded_size, num_layers=2, d_model=32, num_heads=4, head_dim=8, ffn_dim=64,
                    max_seq_len=64)


@pytest.fixture(scope="module")
def params():
    """Random weights with the zero-initialised output projections perturbed, so every layer mixes tokens."""
    params = nn.unbox(CM3LeonDecoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def prompt(*pieces):
    return np.array([vocab_lib.EOS, *VOCAB.text_ids(np.array(pieces)), vocab_lib.BREAK], np.int32)


def full_forward_scores(params, sequence):
    """Next-token log-probabilities after every prefix, recomputed from scratch (no cache)."""
    logits = CM3LeonDecoder(CFG).apply({"params": params}, jnp.asarray(sequence)[None])
    return jax.nn.log_softmax(logits[0], axis=-1)


def test_kv_cache_decoding_equals_full_recompute_at_every_step(params):
    greedy = GREEDY
    tokens, mask = left_pad([prompt(3, 4, 5)])
    generated, lengths = make_decoder(CFG, VOCAB, Schedule.image(12), greedy)(params, tokens, mask,
                                                                                jax.random.key(0))
    generated = np.asarray(generated[0])
    sequence = np.concatenate([prompt(3, 4, 5), generated])
    scores = np.asarray(full_forward_scores(params, sequence))
    allowed = VOCAB.modality(np.arange(VOCAB.padded_size)) == vocab_lib.MODALITY_IMAGE
    for step, token in enumerate(generated):
        row = scores[len(prompt(3, 4, 5)) - 1 + step]
        assert token == np.argmax(np.where(allowed, row, -np.inf))  # greedy under the image constraint
    assert lengths[0] == 12


def test_image_grid_embedding_decodes_like_full_recompute_from_mid_image():
    """model.image_grid_embedding: a prompt that ends inside an image (3 codes of a 3x3 grid) continues from cell 3,
    in the prefill and in each cached step, as a full recompute of the whole sequence counts it."""
    cfg = DecoderConfig(**{**CFG.__dict__, "image_code_range": (VOCAB.image_offset, VOCAB.size),
                           "image_grid_cells": 9})
    params = nn.unbox(CM3LeonDecoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)
    start = np.concatenate([prompt(3, 4, 5), VOCAB.image_ids(np.array([1, 7, 2]))])
    generated, _ = make_decoder(cfg, VOCAB, Schedule.image(6), GREEDY)(params, *left_pad([start]), jax.random.key(0))
    sequence = np.concatenate([start, np.asarray(generated[0])])
    scores = jax.nn.log_softmax(CM3LeonDecoder(cfg).apply({"params": params}, jnp.asarray(sequence)[None])[0])
    allowed = VOCAB.modality(np.arange(VOCAB.padded_size)) == vocab_lib.MODALITY_IMAGE
    for step, token in enumerate(np.asarray(generated[0])):
        assert token == np.argmax(np.where(allowed, scores[len(start) - 1 + step], -np.inf))
    # The cell embeddings reach the logits: shuffling them changes what follows an image code and nothing else.
    shuffled = {**params, "image_grid_embedding": params["image_grid_embedding"][::-1]}
    other = jax.nn.log_softmax(CM3LeonDecoder(cfg).apply({"params": shuffled}, jnp.asarray(sequence)[None])[0])
    is_image = VOCAB.modality(sequence) == vocab_lib.MODALITY_IMAGE
    first_image = int(np.argmax(is_image))
    np.testing.assert_allclose(other[:first_image], scores[:first_image], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[first_image:], scores[first_image:], atol=1e-3)


def test_left_padded_prompts_decode_like_unpadded_ones(params):
    greedy = GREEDY
    run = make_decoder(CFG, VOCAB, Schedule.text(6), greedy)
    short, long = prompt(7), prompt(3, 4, 5, 6, 8)
    together, _ = run(params, *left_pad([short, long]), jax.random.key(0))
    alone, _ = run(params, *left_pad([short]), jax.random.key(0))
    np.testing.assert_array_equal(together[0], alone[0])


def test_image_spans_have_exactly_grid_squared_codes_and_text_has_none(params):
    sampled = SamplingOptions(temperature=1.0, guidance="none")
    tokens, mask = left_pad([prompt(1, 2)] * 4)
    image, lengths = make_decoder(CFG, VOCAB, Schedule.image(16), sampled)(params, tokens, mask, jax.random.key(3))
    assert np.all(VOCAB.modality(np.asarray(image)) == vocab_lib.MODALITY_IMAGE) and np.all(lengths == 16)
    text, lengths = make_decoder(CFG, VOCAB, Schedule.text(20), sampled)(params, tokens, mask, jax.random.key(3))
    text = np.asarray(text)
    for row, n in zip(text, np.asarray(lengths)):
        body = row[:n]
        assert not np.any(VOCAB.modality(body) == vocab_lib.MODALITY_IMAGE)
        stops = np.isin(body, (vocab_lib.EOS, vocab_lib.BREAK, vocab_lib.EOSS))
        assert not stops[:-1].any() and (n == 20 or stops[-1])  # stops at its first stop token
        assert np.all(row[n:] == vocab_lib.PAD)


def test_forced_positions_are_emitted_as_scheduled(params):
    forced = np.array([FREE, FREE, vocab_lib.EOSS, VOCAB.mask_id(1), FREE, vocab_lib.EOSS], np.int32)
    schedule = Schedule(forced, np.full(6, SAMPLE_IMAGE, np.int32))
    tokens, mask = left_pad([prompt(5)])
    plain = SamplingOptions(guidance="none")
    out, _ = make_decoder(CFG, VOCAB, schedule, plain)(params, tokens, mask, jax.random.key(0))
    out = np.asarray(out[0])
    assert list(out[[2, 3, 5]]) == [vocab_lib.EOSS, VOCAB.mask_id(1), vocab_lib.EOSS]
    assert np.all(VOCAB.modality(out[[0, 1, 4]]) == vocab_lib.MODALITY_IMAGE)


def test_same_seed_same_output_and_another_seed_differs(params):
    run = make_decoder(CFG, VOCAB, Schedule.image(16), SamplingOptions(temperature=1.0, top_k=8, guidance="none"))
    tokens, mask = left_pad([prompt(1, 2)] * 2)
    first, _ = run(params, tokens, mask, jax.random.key(5))
    again, _ = run(params, tokens, mask, jax.random.key(5))
    other, _ = run(params, tokens, mask, jax.random.key(6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_guidance_with_scale_one_is_the_conditional_stream(params):
    cond, uncond = prompt(3, 4), np.array([vocab_lib.EOS, VOCAB.mask_id(0), vocab_lib.BREAK], np.int32)
    greedy = GREEDY
    plain, _ = make_decoder(CFG, VOCAB, Schedule.image(8), greedy)(params, *left_pad([cond]), jax.random.key(0))
    guided_options = SamplingOptions(temperature=0.0, guidance="cfg", cfg_scale=1.0)
    guided, _ = make_decoder(CFG, VOCAB, Schedule.image(8), guided_options)(params, *left_pad([cond, uncond]),
                                                                              jax.random.key(0))
    np.testing.assert_array_equal(plain, guided)
    strong = SamplingOptions(temperature=0.0, guidance="cfg", cfg_scale=5.0)
    pushed, _ = make_decoder(CFG, VOCAB, Schedule.image(8), strong)(params, *left_pad([cond, uncond]),
                                                                      jax.random.key(0))
    assert not np.array_equal(plain, pushed)


def test_processors_on_crafted_logits():
    scores = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]]))
    keep = lambda s: list(np.flatnonzero(np.isfinite(np.asarray(s[0]))))  # noqa: E731
    assert keep(processors.top_k_filter(scores, 2)) == [1, 2]
    assert keep(processors.top_p_filter(scores, 0.7)) == [1, 2]  # 0.4 + 0.3 reaches 0.7
    assert keep(processors.top_p_filter(scores, 0.71)) == [1, 2, 3]
    assert keep(processors.top_p_filter(scores, 0.01)) == [1]
    cond = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    uncond = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]]))
    # k=2: the 2nd largest p_c is 0.25; alpha=0.5 keeps p_c >= 0.125: tokens 0, 1, 2.
    cdk = np.asarray(processors.contrastive_top_k(cond, uncond, alpha=0.5, k=2))[0]
    assert list(np.flatnonzero(np.isfinite(cdk))) == [0, 1, 2]
    np.testing.assert_allclose(cdk[:3], np.log([0.5 / 0.7, 0.25 / 0.1, 0.15 / 0.1]), rtol=1e-5)
    guided = processors.classifier_free_guidance(cond, uncond, 3.0)
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-6)
    three = processors.three_stream_guidance(cond, uncond, uncond, 1.5, 7.5)
    np.testing.assert_allclose(three, uncond + 7.5 * (cond - uncond), rtol=1e-5)


def test_sharded_decoding_equals_one_device(params, tiny_config):
    from cm3jax.parallel.mesh import create_mesh
    from cm3jax.parallel.sharding import logical_axis_rules, logical_to_shardings

    options = SamplingOptions(temperature=1.0, guidance="cfg", cfg_scale=3.0)
    cond, uncond = [prompt(3, i) for i in range(4)], [np.array([vocab_lib.EOS, VOCAB.mask_id(0), vocab_lib.BREAK])] * 4
    tokens, mask = left_pad(cond + uncond)
    single, _ = make_decoder(CFG, VOCAB, Schedule.image(10), options)(params, tokens, mask, jax.random.key(2))
    tiny_config.mesh.ici.update(data=2, fsdp=2, tensor=2)
    mesh = create_mesh(tiny_config, jax.devices())
    rules = logical_axis_rules(tiny_config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: CM3LeonDecoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
        shardings = logical_to_shardings(boxed["params"], mesh, rules)
        sharded_params = jax.device_put(params, shardings)
        sharded, _ = jax.jit(lambda p, t, m, r: decode(CFG, VOCAB, p, t, m, Schedule.image(10), options, r))(
            sharded_params, tokens, mask, jax.random.key(2))
    assert len(jax.tree.leaves(sharded_params)[0].sharding.device_set) == 8
    np.testing.assert_array_equal(single, sharded)
