"""The OPT mapping (export/opt.py) and the safetensors writer: transformers' OPTForCausalLM, given the exported
tensors, computes cm3jax's logits (a left-padded row included), and the unified tokenizer gives cm3jax's ids."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.export import opt
from cm3jax.export.params_reader import leaves
from cm3jax.export.safetensors_writer import write_safetensors
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig

from helpers import tiny_pipeline_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_model():
    config = tiny_pipeline_config()
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    model = CM3LeonDecoder(DecoderConfig.from_config(config.model, vocab.padded_size, "cpu"))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # The init zeroes the projections into the residual stream: perturb every tensor so each one is checked.
    leaves_ = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.key(1), len(leaves_))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves_, keys)]
    return config, vocab, model, jax.tree.unflatten(jax.tree.structure(params), noisy)


def _export(folder, config, vocab, params, max_shard_bytes=1 << 30):
    tensors = [t for path, leaf in leaves(jax.device_get(params)) for t in opt.opt_tensors(path, np.asarray(leaf))]
    files = write_safetensors(folder, [(n, v.shape, v.dtype) for n, v in tensors], tensors, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(opt.opt_config(config.model, vocab, "float32")))
    return files


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 64 << 10])
def test_transformers_computes_cm3jaxs_logits_from_the_exported_tensors(tmp_path, max_shard_bytes):
    config, vocab, model, params = _tiny_model()
    files = _export(tmp_path, config, vocab, params, max_shard_bytes)
    assert (len(files) == 1) == (max_shard_bytes == 1 << 30)
    tokens = np.random.RandomState(0).randint(0, vocab.size, (2, 12))
    expected = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    assert set(hf.state_dict()) == set(transformers.OPTForCausalLM(hf.config).state_dict())
    padded = np.concatenate([np.zeros((1, 3), tokens.dtype), tokens[1:, :-3]], axis=1)
    batch = torch.tensor(np.stack([tokens[0], padded[0]]))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        logits = hf(batch, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits[0], expected[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 3:], expected[1, :-3], atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value, named", [("activation", "swiglu", "model.activation"),
                                                  ("qk_norm", True, "model.qk_norm"),
                                                  ("layer_norm_epsilon", 1e-6, "model.layer_norm_epsilon")])
def test_an_option_opt_cannot_express_is_refused_by_name(field, value, named):
    config = tiny_pipeline_config()
    config.model[field] = value
    with pytest.raises(opt.UnexportableModelError, match=named):
        opt.opt_config(config.model, vocab_lib.UnifiedVocab.from_config(config.vocab), "float32")
