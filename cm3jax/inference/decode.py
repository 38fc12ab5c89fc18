"""Batched, jitted incremental decoding with the decoder's KV cache: the prompt is prefilled in one call, then one
token per step inside a `jax.lax.while_loop`.

Guidance runs several prompt streams as one batch (docs/paper.md §5): row s * B + b is stream s of example b; every
stream is fed the token sampled for its example, and the streams' next-token log-probabilities are combined
(`cm3jax.inference.processors`) before sampling. Prompts are left-padded: padding is segment 0, which real tokens
never attend to, and positions count real tokens only, so a padded prompt decodes exactly like an unpadded one.

A `Schedule` says, for every generated position, which token is forced (e.g. `<eoss>` closing an infilled span) or
which modality may be sampled, so "exactly grid^2 image codes, then close the span" is a constraint of the loop, not
a hope. Text steps stop an example at a stop token; the loop ends when every example has stopped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.config import default
from cm3jax.inference import processors
from cm3jax.models.transformer import CM3LeonDecoder, DecoderConfig, decoding_params

FREE = -1  # schedule entry: sample this position (under its modality constraint)
SAMPLE_IMAGE, SAMPLE_TEXT = 0, 1


# Guidance kinds and the prompt streams each decodes (the full condition first).
GUIDANCE_STREAMS = {"none": 1, "cfg": 2, "cdk": 2, "edit": 3}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    temperature: float = default("generate.temperature")  # 0: greedy
    top_k: int = default("generate.top_k")  # 0: off
    top_p: float = default("generate.top_p")  # 1: off
    guidance: str = default("generate.guidance")  # none | cfg | cdk | edit (three streams)
    cfg_scale: float = default("generate.cfg_scale")  # cfg: uncond + scale * (cond - uncond)
    cdk_alpha: float = default("generate.cdk_alpha")  # cdk: keep tokens with p_cond >= alpha * (k-th largest p_cond)
    cdk_k: int = default("generate.cdk_k")
    image_scale: float = default("generate.image_scale")  # edit: Chameleon's image guidance
    text_scale: float = default("generate.text_scale")  # edit: text guidance

    @property
    def num_streams(self) -> int:
        return GUIDANCE_STREAMS[self.guidance]

    @classmethod
    def from_config(cls, c) -> SamplingOptions:
        """From the config's generate section."""
        return cls(temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p),
                   guidance=str(c.guidance), cfg_scale=float(c.cfg_scale), cdk_alpha=float(c.cdk_alpha),
                   cdk_k=int(c.cdk_k), image_scale=float(c.image_scale), text_scale=float(c.text_scale))


# Deterministic decoding of one stream: captions and answers.
GREEDY = SamplingOptions(temperature=0.0, guidance="none")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per generated position: `forced` token id (FREE: sample) and the modality sampled there (SAMPLE_IMAGE /
    SAMPLE_TEXT). Text positions stop an example at any of `stop_tokens`."""

    forced: np.ndarray  # [T] int32
    modality: np.ndarray  # [T] int32
    stop_tokens: tuple[int, ...] = (vocab_lib.EOS, vocab_lib.BREAK, vocab_lib.EOSS)

    @classmethod
    def image(cls, num_codes: int) -> Schedule:
        """Exactly `num_codes` image codes (a whole image span)."""
        return cls(np.full(num_codes, FREE, np.int32), np.full(num_codes, SAMPLE_IMAGE, np.int32))

    @classmethod
    def text(cls, max_tokens: int, stop_tokens: tuple[int, ...] = (vocab_lib.EOS, vocab_lib.BREAK,
                                                                   vocab_lib.EOSS)) -> Schedule:
        """Up to `max_tokens` text tokens, ending at a stop token (which is kept)."""
        return cls(np.full(max_tokens, FREE, np.int32), np.full(max_tokens, SAMPLE_TEXT, np.int32), stop_tokens)

    def __len__(self) -> int:
        return len(self.forced)


def allowed_tokens(vocab: vocab_lib.UnifiedVocab, stop_tokens: tuple[int, ...]) -> np.ndarray:
    """[2, padded vocab] bool: row SAMPLE_IMAGE allows only image codes; row SAMPLE_TEXT allows text pieces and the
    stop tokens (never image codes, padding, sentinels or the table's padding rows)."""
    ids = np.arange(vocab.padded_size)
    modality = vocab.modality(ids)
    image = modality == vocab_lib.MODALITY_IMAGE
    text = (modality == vocab_lib.MODALITY_TEXT) | np.isin(ids, stop_tokens)
    return np.stack([image, text])


def left_pad(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [n, max_len] left-padded with <pad>, mask [n, max_len] True on real tokens)."""
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), vocab_lib.PAD, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("an empty prompt cannot be decoded (every prompt starts with <eos>)")
        tokens[i, length - len(p):], mask[i, length - len(p):] = p, True
    return tokens, mask


def _empty_cache(model: CM3LeonDecoder, rows: int, length: int) -> Any:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((rows, length), jnp.int32)))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode(cfg: DecoderConfig, vocab: vocab_lib.UnifiedVocab, params: Any, tokens: jax.Array, mask: jax.Array,
           schedule: Schedule, options: SamplingOptions, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generates `len(schedule)` positions after each prompt.

    params: the decoder's, stacked as trained (split per layer here, a copy) or already split by `decoding_params`.
    tokens, mask [streams * B, P] (left-padded, from `left_pad`); returns (generated [B, T] int32 with <pad> after an
    example stopped, lengths [B] including the stop token). Jit it with the schedule and options static, e.g. via
    `make_decoder`.
    """
    streams = options.num_streams
    rows, prompt_len = tokens.shape
    batch = rows // streams
    steps = len(schedule)
    if prompt_len + steps > cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + generated ({steps}) tokens exceed the model's {cfg.max_seq_len} "
                         f"positions")
    model = CM3LeonDecoder(cfg, decode=True)
    params = decoding_params(params, cfg.num_layers)
    cache = _empty_cache(model, rows, prompt_len + steps)
    segment = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment, axis=1) - 1, 0)
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens, positions, segment, prefill=True,
                                  mutable=["cache"])
    next_position = positions[:, -1] + 1
    allowed = jnp.asarray(allowed_tokens(vocab, schedule.stop_tokens))
    forced, modality = jnp.asarray(schedule.forced), jnp.asarray(schedule.modality)
    stops = jnp.asarray(schedule.stop_tokens, jnp.int32)

    def body(carry):
        step, cache, last, out, done, lengths = carry
        scores = processors.guide(last.reshape(streams, batch, -1), options)
        scores = jnp.where(allowed[modality[step]][None], scores, -jnp.inf)
        sampled = processors.sample(scores, options, jax.random.fold_in(rng, step))
        token = jnp.where(forced[step] >= 0, forced[step], sampled)
        token = jnp.where(done, vocab_lib.PAD, token).astype(jnp.int32)
        out = out.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        stopped = (modality[step] == SAMPLE_TEXT) & (forced[step] < 0) & jnp.isin(token, stops)
        done = done | stopped
        feed = jnp.tile(token, streams)[:, None]
        logits, mutated = model.apply({"params": params, "cache": cache}, feed, (next_position + step)[:, None],
                                      jnp.ones_like(feed), mutable=["cache"])
        return step + 1, mutated["cache"], logits[:, -1], out, done, lengths

    def cond(carry):
        step, *_, done, _ = carry
        return (step < steps) & ~jnp.all(done)

    init = (jnp.zeros((), jnp.int32), mutated["cache"], logits[:, -1], jnp.full((batch, steps), vocab_lib.PAD,
                                                                                 jnp.int32),
            jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32))
    _, _, _, out, _, lengths = jax.lax.while_loop(cond, body, init)
    return out, lengths


def make_decoder(cfg: DecoderConfig, vocab: vocab_lib.UnifiedVocab, schedule: Schedule, options: SamplingOptions):
    """decode as a jitted function (params, tokens, mask, rng) -> (generated, lengths)."""
    return jax.jit(lambda params, tokens, mask, rng: decode(cfg, vocab, params, tokens, mask, schedule, options,
                                                            rng))
