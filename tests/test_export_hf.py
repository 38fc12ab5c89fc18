"""`cm3jax export` in the hf format, loaded and run by transformers alone: the tensors give cm3jax's logits (a
left-padded row included), greedy decoding with and without classifier-free guidance gives cm3jax's tokens, a
bfloat16 export stays within MaxText's KL bound, the tokenizer gives cm3jax's ids, and a checkpoint written from the
8-device mesh exports the same bytes as one written from one device."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from etils import epath
from PIL import Image

from cm3jax import stages
from cm3jax import vocab as vocab_lib
from cm3jax.export.params_reader import ParamsReader, abstract_params, is_stacked_layers, leaves
from cm3jax.inference.decode import GREEDY, SamplingOptions, Schedule, left_pad, make_decoder
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig
from cm3jax.parallel.mesh import create_mesh
from cm3jax.parallel.sharding import logical_axis_rules
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.train.checkpoint import Checkpointer, saved_config
from cm3jax.train.lm import lm_state_init
from cm3jax.train.loop import abstract_state_and_shardings
from cm3jax.workdir import StageDir, Workdir

from helpers import copy_run, tiny_pipeline_config

pytestmark = [pytest.mark.slow]

EXPORTED_STEP = 5
IMAGE_TOKENS = 32
KL_BOUND = 0.015  # MaxText's check of a bfloat16 conversion


def _perturbed(params):
    """Every tensor moved away from its init (which zeroes the projections into the residual stream), so each one
    is checked."""
    leaves = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [np.asarray(p) + 0.05 * np.asarray(jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(jax.tree.structure(params), noisy)


def _save_lm_step(workdir, devices, mesh_axes):
    """The LM's last checkpoint (step 4) with every parameter perturbed, saved again as EXPORTED_STEP from a mesh of
    `devices`; returns the parameters."""
    config = workdir.resolve(tiny_pipeline_config())
    config.mesh.ici.update(**mesh_axes)
    mesh = create_mesh(config, devices)
    abstract, shardings = abstract_state_and_shardings(lm_state_init(config)[0], mesh, logical_axis_rules(config))
    checkpointer = Checkpointer(workdir.lm.checkpoints, keep=10, async_save=False)
    try:
        state, data_state = checkpointer.restore(4, abstract, shardings)
        params = _perturbed(jax.device_get(state.params))
        state = state.replace(params=jax.device_put(params, shardings.params))
        checkpointer.save(EXPORTED_STEP, state, data_state,
                          {"json": json.dumps(saved_config(workdir.lm.checkpoints, 4))})
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return params


def _export(workdir, **export):
    config = tiny_pipeline_config()
    config.export.update(export)
    assert stages.by_command("export").run(config, workdir)
    return workdir.export_folder("lm", EXPORTED_STEP, "hf", export.get("dtype", "float32"))


@pytest.fixture(scope="module")
def exported(tiny_pipeline_run, tmp_path_factory):
    """The tiny run's LM with perturbed parameters, saved from one device and from the 8-device mesh and exported
    from each (float32), and once more in bfloat16."""
    root = tmp_path_factory.mktemp("export")
    one = Workdir(copy_run(tiny_pipeline_run, root / "one"))
    params = _save_lm_step(one, jax.devices()[:1], {})
    sharded = Workdir(copy_run(tiny_pipeline_run, root / "sharded"))
    _save_lm_step(sharded, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2})
    config = one.resolve(tiny_pipeline_config())
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    return {"params": params, "vocab": vocab, "workdir": one,
            "model": CM3LeonDecoder(DecoderConfig.for_run(config, vocab, "cpu")),
            "float32": shutil.copytree(_export(one), root / "float32"), "sharded": _export(sharded),
            "bfloat16": _export(one, dtype="bfloat16")}


def _cm3jax_logits(exported, tokens):
    return np.asarray(exported["model"].apply({"params": exported["params"]}, jnp.asarray(tokens)))


def _opt(folder):
    return transformers.OPTForCausalLM.from_pretrained(folder).eval()


def test_transformers_loads_the_export_and_computes_cm3jaxs_logits(exported):
    hf = _opt(exported["float32"])
    assert set(hf.state_dict()) == set(transformers.OPTForCausalLM(hf.config).state_dict())
    assert (hf.config.pad_token_id, hf.config.eos_token_id) == (vocab_lib.PAD, vocab_lib.EOS)
    tokens = np.random.RandomState(0).randint(0, exported["vocab"].size, (2, 12))
    expected = _cm3jax_logits(exported, tokens)
    # Row 1 is row 1's first 9 tokens after 3 <pad>: OPT counts positions from the first unmasked token.
    batch = torch.tensor(np.stack([tokens[0], np.concatenate([[vocab_lib.PAD] * 3, tokens[1, :9]])]))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        logits = hf(batch, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits[0], expected[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1, 3:], expected[1, :9], atol=1e-4, rtol=0)


def test_a_checkpoint_of_the_8_device_mesh_exports_the_bytes_of_a_one_device_one(exported):
    names = sorted(p.name for p in exported["float32"].iterdir())
    assert names == sorted(p.name for p in exported["sharded"].iterdir())
    assert "model.safetensors" in names
    for name in names:
        if name == "cm3jax_config.json":  # the training config names each run's own folders
            continue
        if name == "vqgan":
            name = "vqgan/model.safetensors"
        assert (exported["float32"] / name).read_bytes() == (exported["sharded"] / name).read_bytes(), name


def _stacked_leaves(exported):
    config = exported["workdir"].resolve(tiny_pipeline_config())
    return [(path, leaf) for path, leaf in leaves(abstract_params(config)) if is_stacked_layers(path)]


def _param(params, path):
    for key in path:
        params = params[key]
    return np.asarray(params)


def test_export_reads_a_stacked_parameter_one_layer_at_a_time(exported):
    reader = ParamsReader(exported["workdir"].lm, EXPORTED_STEP)
    stacked = _stacked_leaves(exported)
    assert stacked
    for path, leaf in stacked:
        blocks = list(reader.read_layer_blocks(path, leaf))
        assert [(first, block.shape[0]) for first, block in blocks] == [(i, 1) for i in range(leaf.shape[0])]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), _param(exported["params"], path))


def test_a_checkpoint_stored_in_whole_array_chunks_is_read_in_one_block(exported, tmp_path, monkeypatch):
    """Checkpoints written before layers were chunked one by one still export (a parameter at once)."""
    import cm3jax.train.checkpoint as checkpoint_lib

    monkeypatch.setattr(checkpoint_lib, "layer_chunked_save_args", lambda tree: None)
    stage = StageDir.at(tmp_path / "lm")
    checkpointer = Checkpointer(stage.checkpoints, keep=1, async_save=False)
    checkpointer.save(EXPORTED_STEP, {"params": exported["params"]}, {}, {"json": "{}"})
    checkpointer.wait_until_finished()
    checkpointer.close()
    reader = ParamsReader(stage, EXPORTED_STEP)
    for path, leaf in _stacked_leaves(exported):
        [(first, block)] = reader.read_layer_blocks(path, leaf)
        assert first == 0
        np.testing.assert_array_equal(block, _param(exported["params"], path))


def test_a_model_above_the_shard_size_is_split_with_an_index_that_transformers_follows(exported, tmp_path):
    from cm3jax.export.hf import export_hf

    workdir = exported["workdir"]
    config = workdir.resolve(tiny_pipeline_config())
    export_hf(config, workdir, "lm", EXPORTED_STEP, epath.Path(tmp_path), "float32", max_shard_bytes=64 << 10)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    tokens = torch.tensor(np.random.RandomState(2).randint(0, exported["vocab"].size, (1, 10)))
    with torch.no_grad():
        torch.testing.assert_close(_opt(tmp_path)(tokens).logits, _opt(exported["float32"])(tokens).logits,
                                   rtol=0, atol=0)


def _prompts(exported):
    """A text -> image prompt `<eos> caption <break>` and its unconditional stream `<eos> <mask:0> <break>`."""
    vocab = exported["vocab"]
    caption = vocab.text_ids(np.arange(5, 12))
    conditional = np.concatenate([[vocab_lib.EOS], caption, [vocab_lib.BREAK]]).astype(np.int32)
    return conditional, np.array([vocab_lib.EOS, vocab.mask_id(0), vocab_lib.BREAK], np.int32)


@pytest.mark.parametrize("guidance", ["none", "cfg"])
def test_greedy_image_codes_are_cm3jaxs_with_and_without_classifier_free_guidance(exported, guidance):
    vocab = exported["vocab"]
    conditional, unconditional = _prompts(exported)
    options = SamplingOptions(temperature=0.0, top_k=0, top_p=1.0, guidance=guidance, cfg_scale=3.0)
    streams = [conditional, unconditional][:options.num_streams]
    tokens, mask = left_pad(streams)
    decoder = make_decoder(exported["model"].cfg, vocab, Schedule.image(IMAGE_TOKENS), options)
    expected, _ = decoder(exported["params"], jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))

    not_image = [i for i in range(vocab.padded_size) if not vocab.image_offset <= i < vocab.size]
    cfg = {"guidance_scale": 3.0, "negative_prompt_ids": torch.tensor(unconditional[None])} if guidance == "cfg" else {}
    with torch.no_grad():
        out = _opt(exported["float32"]).generate(
            torch.tensor(conditional[None]), attention_mask=torch.ones(1, len(conditional), dtype=torch.long),
            do_sample=False, max_new_tokens=IMAGE_TOKENS, min_new_tokens=IMAGE_TOKENS, suppress_tokens=not_image,
            **cfg)
    np.testing.assert_array_equal(out[0, len(conditional):].numpy(), np.asarray(expected)[0])


def test_a_bfloat16_export_keeps_the_next_token_distribution_within_maxtexts_kl_bound(exported):
    config = json.loads((exported["bfloat16"] / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    hf = transformers.OPTForCausalLM.from_pretrained(exported["bfloat16"], dtype=torch.bfloat16).eval()
    assert next(hf.parameters()).dtype == torch.bfloat16
    tokens = np.random.RandomState(1).randint(0, exported["vocab"].size, (4, 24))
    reference = jax.nn.log_softmax(_cm3jax_logits(exported, tokens), axis=-1)
    with torch.no_grad():
        logits = hf(torch.tensor(tokens)).logits.float()
    exported_logp = torch.log_softmax(logits, dim=-1).numpy()
    kl = np.sum(np.exp(reference) * (reference - exported_logp), axis=-1)
    assert 0 < float(np.max(kl)) <= KL_BOUND, float(np.max(kl))


ODD_STRINGS = ["", "a red circle", "  runs   of \t whitespace \n\n", "日本語のテキスト", "emoji 🎨🟥 ok",
               "digits 12345", "<eos> <pad> <break> <unk> <s> <0x41>", "<cm3 eos>", "x" * 300]


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_the_exported_tokenizer_gives_cm3jaxs_ids(exported, text):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported["float32"])
    text_tokenizer = TextTokenizer.load(str(exported["workdir"].text_tokenizer))
    expected = exported["vocab"].text_ids(text_tokenizer.encode(text)).tolist()
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == text


def test_the_pytorch_vqgan_encodes_to_the_flax_codes_and_decodes_within_1e_4(exported):
    from cm3jax.tokenizers.image import ImageTokenizer

    workdir = exported["workdir"]
    flax_vqgan = ImageTokenizer.load(workdir.resolve(tiny_pipeline_config()), workdir)
    torch_vqgan = transformers.AutoModel.from_pretrained(exported["float32"] / "vqgan", trust_remote_code=True).eval()
    images = np.random.RandomState(3).randint(0, 256, (4, flax_vqgan.image_size, flax_vqgan.image_size, 3), np.uint8)
    pixels = torch_vqgan.from_uint8(torch.from_numpy(images))
    np.testing.assert_array_equal(torch_vqgan.encode(pixels).numpy(), flax_vqgan.encode(images))
    codes = np.random.RandomState(4).randint(0, flax_vqgan.model_config.codebook_size, (4, flax_vqgan.grid,
                                                                                        flax_vqgan.grid))
    expected = flax_vqgan._decode(flax_vqgan.params, jnp.asarray(codes, jnp.int32))
    decoded = torch_vqgan.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(decoded, np.asarray(expected), atol=1e-4, rtol=0)


def test_the_model_cards_example_runs_as_written_without_cm3jax_and_draws_cm3jaxs_greedy_image(exported):
    from cm3jax.inference.generate import Generator

    folder = exported["float32"]
    card = (folder / "README.md").read_text()
    example = card.split("```python\n")[1].split("```")[0]
    # cm3jax made unimportable: the example needs torch, transformers and pillow only.
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['cm3jax'] = None\n" + example], cwd=folder,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    caption = run.stdout.rstrip("\n").split("\n")[-1]
    drawn = np.asarray(Image.open(folder / "image.png"))

    workdir = exported["workdir"]
    config = workdir.resolve(tiny_pipeline_config())
    generator = Generator.load(config, workdir, model="lm")
    greedy_cfg = SamplingOptions(temperature=0.0, top_k=0, top_p=1.0, guidance="cfg",
                                 cfg_scale=float(config.generate.cfg_scale))
    images, _ = generator.images("a picture", 1, greedy_cfg)
    # The same codes; pixels may differ by one level where float32 rounding crosses an integer.
    assert np.max(np.abs(drawn.astype(int) - images[0].astype(int))) <= 1
    # The same caption tokens. (Decoded apart: on bytes that are not UTF-8, which an untrained model writes,
    # transformers' byte fallback replaces the whole run of bytes, SentencePiece only the invalid ones.)
    prompt = generator.prompter.caption(generator.encode_image(drawn), "infill", max_tokens=32)
    out, length = generator.run(prompt, 1, GREEDY, seed=0)
    ids = [int(i) for i in out[0, :length[0]] if exported["vocab"].text_offset <= i < exported["vocab"].image_offset]
    assert caption == transformers.AutoTokenizer.from_pretrained(folder).decode(ids)
