"""The README.md of an hf export: what the model is, how it was trained, its `cm3jax eval` scores, and a PyTorch
example (caption -> image with classifier-free guidance, then the image captioned back) that needs torch,
transformers and pillow only. tests/test_export_hf.py runs the example as written."""
from __future__ import annotations

import json

import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.data.sft import CAPTION_INSTRUCTION
from cm3jax.models.vqgan import VQGANConfig

EXAMPLE = '''import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer, OPTForCausalLM

folder = "."  # this folder
lm, tokenizer = OPTForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
vqgan = AutoModel.from_pretrained(f"{{folder}}/vqgan", trust_remote_code=True).eval()
EOS, BREAK, EOSS, MASK = {eos}, {brk}, {eoss}, {mask}  # the unified vocabulary's special ids
TEXT, IMAGE, GRID = range({text_start}, {text_end}), range({image_start}, {image_end}), {grid}
only = lambda allowed: [i for i in range(lm.config.vocab_size) if i not in allowed]  # ids to suppress

# Caption -> image: {grid}x{grid} codes, classifier-free guidance against the caption masked out, greedy.
prompt = torch.tensor([[EOS, *tokenizer({caption!r}).input_ids, BREAK]])
out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, suppress_tokens=only(IMAGE),
                  max_new_tokens=GRID * GRID, min_new_tokens=GRID * GRID,
                  guidance_scale={cfg_scale}, negative_prompt_ids=torch.tensor([[EOS, MASK, BREAK]]))
codes = (out[:, prompt.shape[1]:] - IMAGE.start).reshape(1, GRID, GRID)
Image.fromarray(vqgan.to_uint8(vqgan.decode(codes))[0].numpy()).save("image.png")

# Image -> caption: the caption is a masked span, infilled after the image and ended by <eoss>.
image = torch.from_numpy(np.array(Image.open("image.png").convert("RGB").resize(({size}, {size}))))
codes = vqgan.encode(vqgan.from_uint8(image[None])).flatten() + IMAGE.start
prompt = torch.tensor([[EOS, *tokenizer({caption_prefix!r}).input_ids, MASK, BREAK, *codes.tolist(), MASK]])
out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                  eos_token_id=[EOSS, EOS], suppress_tokens=only([*TEXT, EOSS, EOS]))
print(tokenizer.decode([i for i in out[0, prompt.shape[1]:].tolist() if i in TEXT]))
'''


def example(config: ml_collections.ConfigDict, model: str) -> str:
    """The card's PyTorch example for this run's vocabulary, image grid, first sample prompt and guidance scale."""
    vocab = vocab_lib.UnifiedVocab.from_config(config.vocab)
    vqgan = VQGANConfig.from_config(config)
    prompts = tuple(config.generate.sample_prompts)
    return EXAMPLE.format(
        eos=vocab_lib.EOS, brk=vocab_lib.BREAK, eoss=vocab_lib.EOSS, mask=vocab.mask_id(0),
        text_start=vocab.text_offset, text_end=vocab.image_offset, image_start=vocab.image_offset,
        image_end=vocab.size, grid=vqgan.grid_size, size=vqgan.image_size, cfg_scale=float(config.generate.cfg_scale),
        caption=prompts[0] if prompts else "a picture",
        caption_prefix=f"{CAPTION_INSTRUCTION} " if model == "sft" else "")


def model_card(config: ml_collections.ConfigDict, model: str, step: int, metrics: dict | None) -> str:
    m = config.model
    scores = "\nNot scored by `cm3jax eval` before export.\n"
    if metrics:
        scores = f"\n## `cm3jax eval` scores (held-out documents)\n\n```json\n{json.dumps(metrics, indent=1)}\n```\n"
    training = ("It was instruction-tuned (SFT) after pretraining." if model == "sft" else
                "Pretrained (retrieval-augmented CM3 objective), not instruction-tuned.")
    return f"""# cm3jax {model} model, step {step}

A CM3leon-style decoder-only transformer trained with cm3jax: one token stream where text is SentencePiece pieces and
images are VQ-GAN codes, so the same model draws images from captions and captions images. {training}

- `config.json`, `model.safetensors`: the decoder as transformers' `OPTForCausalLM` ({m.num_layers} layers, width
  {m.d_model}, {m.num_heads} heads, {m.max_seq_len} positions, no biases, LayerNorms without parameters).
- `tokenizer.json`: the whole vocabulary (special tokens, text pieces, image codes); text gives cm3jax's ids. Special
  and image tokens are named `<cm3 ...>` and never come out of text; the ids below are what prompts use.
- `vqgan/`: the image tokenizer, PyTorch code included (`trust_remote_code=True`).
- `cm3jax_config.json`: the full training config.

## Example (torch, transformers and pillow only)

```python
{example(config, model)}```
{scores}"""
