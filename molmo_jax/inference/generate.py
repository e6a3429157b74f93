"""Batched text generation with a KV cache: prefill once (image encoded once), then decode.

Axis legend: B batch, L prompt length (bucketed), C crops, P patches, D patch vector,
Q pooled tokens per crop, V logit columns, N new tokens.

    generator = Generator(model)
    out = generator(batch, GenerationConfig(max_new_tokens=12, stop_token_ids=(eos,)))
    out.tokens   # int32[B, N], -1 after the stop token (the stop token itself is not kept)

`batch` holds right-padded numpy arrays as the collator makes them: input_ids int32[B, L] (-1 =
padding), and optionally images float32[B, C, P, D], image_masks float32[B, C, P], image_input_idx
int[B, C, Q]. Rows may have different prompt lengths and crop counts.

Compilation: the prompt is padded to a length bucket (the next power of two from 32 to 512, then
the next multiple of 128, so padding stays under a quarter and, past 512, under 128 tokens) and
decoding runs in chunks of `chunk_size` steps, the last one cut to the tokens still wanted, so a
new prompt length reuses a compiled program unless it crosses a bucket, and no step computes a
token that is thrown away. The KV cache holds exactly the padded prompt and the new tokens.
Between chunks the host checks stop tokens and stop strings and stops early once every row is
finished. Greedy decoding reproduces the official `Molmo.generate` (beam 1): the
first new token comes from the logits at each row's last valid prompt position, next positions
continue from there, and the padded prompt slots stay masked.

Continuous batching (the server) reuses `prefill` and `decode_steps` over a cache whose rows are
slots: `insert_row` puts a request prefilled alone into a free row of a running cache, and
`shift_cache` makes room for it (see the comment above `insert_row`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.model.attention import default_positions
from molmo_jax.model.llm import KVCache
from molmo_jax.model.molmo import Molmo


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens: tokens to generate at most (stop token excluded from the output).
    temperature: 0 = greedy (argmax), else sample from softmax(logits / temperature) restricted
    to the top_k logits (0 = all) and the top_p nucleus (1.0 = all).
    stop_token_ids: a row stops after producing one of these (typically the EOS id).
    stop_strings: a row stops once its decoded text contains one (needs a `decode` function);
    the text is cut before it. chunk_size: decode steps per compiled call."""

    max_new_tokens: int = 12
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    chunk_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.chunk_size < 1:
            raise ValueError(f"invalid sampling settings: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0), "
                             f"chunk_size={self.chunk_size} (>= 1)")


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # int32[B, N]: new tokens, -1 after a row stopped
    texts: Optional[list[str]] = None  # decoded and cut at stop strings, when `decode` was given
    logits: Optional[np.ndarray] = None  # float32[B, N, V], with return_logits


def prompt_bucket(length: int, minimum: int = 32, step: int = 128) -> int:
    """The padded prompt length: the next power of two >= length (at least `minimum`) up to
    4 * step, past that the next multiple of `step` (a 613-token prompt pads to 640, not 1024)."""
    length = int(length)
    if length > 4 * step:
        return -(-length // step) * step
    return max(minimum, 1 << max(0, length - 1).bit_length())


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int) -> jax.Array:
    """Next token per row. logits: float32[B, V] -> int32[B]. temperature, top_p: scalars or
    float32[B] (one per row: a batch that mixes requests); a row with temperature 0 takes the argmax.

    Top-k keeps the k largest logits; top-p then keeps the smallest set of most likely tokens
    whose probability mass reaches top_p (the most likely token always survives).
    """
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    temperature, top_p = jnp.reshape(temperature, (-1, 1)), jnp.reshape(top_p, (-1, 1))
    row_greedy = temperature[:, 0] <= 0
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.where(row_greedy, argmax, sampled)


def pad_prompt(batch: Mapping[str, np.ndarray], length: int) -> dict:
    ids = np.asarray(batch["input_ids"], np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, L], got shape {ids.shape}")
    padded = {"input_ids": np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=-1)}
    if batch.get("images") is not None:
        for key in ("images", "image_masks", "image_input_idx"):
            if batch.get(key) is None:
                raise ValueError(f"batch has images but no {key!r}")
        images = np.asarray(batch["images"], np.float32)
        if images.ndim != 4 or batch["image_input_idx"].shape[:2] != images.shape[:2]:
            raise ValueError(f"images [B, C, P, D] {images.shape} and image_input_idx [B, C, Q] "
                             f"{np.shape(batch['image_input_idx'])} do not agree")
        padded.update(images=images, image_masks=np.asarray(batch["image_masks"], np.float32),
                      image_input_idx=np.asarray(batch["image_input_idx"], np.int32))
    return padded


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy", "top_k"))
def prefill(graphdef, state, prompt, key, temperature, top_p, *, cache_len, greedy, top_k):
    """-> (first new token int32[B], cache, position of that token int32[B], logits [B, V])."""
    model = nnx.merge(graphdef, state)
    ids = prompt["input_ids"]
    valid = ids != -1
    embeds = model.embed(ids, prompt.get("images"), prompt.get("image_masks"), prompt.get("image_input_idx"))
    cache = model.llm.init_cache(ids.shape[0], cache_len)
    logits, cache, _ = model.llm(embeds, default_positions(ids), token_valid=valid, cache=cache)
    return first_token(logits, valid, cache, key, temperature, top_p, greedy=greedy, top_k=top_k)


def first_token(logits, valid, cache, key, temperature, top_p, *, greedy, top_k):
    """The prefill's result from its logits [B, L, V] over a right-padded prompt (valid bool[B, L]):
    (first new token int32[B], cache, position of that token int32[B], its logits [B, V])."""
    lengths = jnp.sum(valid, axis=-1)
    last_logits = logits[jnp.arange(valid.shape[0]), jnp.maximum(lengths - 1, 0)]
    token = sample_tokens(last_logits, key, temperature, top_p, greedy=greedy, top_k=top_k)
    return token, cache, lengths.astype(jnp.int32), last_logits


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy", "top_k", "keep_logits"),
                   donate_argnames=("cache",))
def decode_steps(graphdef, state, token, cache, position, key, temperature, top_p, *, steps, greedy, top_k,
                 keep_logits):
    """Feed `token` at `position` and sample `steps` more tokens.
    -> (tokens int32[B, steps], logits float32[B, steps, V] or None, cache, next position)."""
    model = nnx.merge(graphdef, state)
    ones = jnp.ones((token.shape[0], 1), bool)

    def step(carry, step_key):
        token, cache, position = carry
        logits, cache, _ = model.llm(model.llm.embed_tokens(token[:, None]), position[:, None],
                                     token_valid=ones, cache=cache)
        logits = logits[:, 0]
        token = sample_tokens(logits, step_key, temperature, top_p, greedy=greedy, top_k=top_k)
        return (token, cache, position + 1), (token, logits if keep_logits else None)

    (_, cache, position), (tokens, logits) = jax.lax.scan(step, (token, cache, position),
                                                          jax.random.split(key, steps))
    return tokens.T, None if logits is None else jnp.swapaxes(logits, 0, 1), cache, position


# Slot caches (continuous batching): each row of a KVCache is a slot that a request holds while it
# decodes. All rows write at the shared `cache.index`, so a request's tokens fill the contiguous
# slots [start, index) of its row; a new request's prompt, prefilled alone, is put just below the
# index (`insert_row`), and `shift_cache` moves every row along the slot axis to make room, at
# either end, without changing what any row attends to (RoPE positions live in the keys).


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert_row(cache: KVCache, row_cache: KVCache, row: jax.Array) -> KVCache:
    """Put a prefilled one-row cache (k, v [layers, 1, L, K, H], valid bool[1, L]) into row `row`
    of `cache` (S >= L slots) at slots [index - L, index); the rest of that row becomes invalid.
    Needs cache.index >= L (see `shift_cache`)."""
    length = row_cache.valid.shape[1]
    start = cache.index - length
    k = jax.lax.dynamic_update_slice(cache.k, row_cache.k.astype(cache.k.dtype), (0, row, start, 0, 0))
    v = jax.lax.dynamic_update_slice(cache.v, row_cache.v.astype(cache.v.dtype), (0, row, start, 0, 0))
    valid_row = jax.lax.dynamic_update_slice(jnp.zeros_like(cache.valid[:1]), row_cache.valid, (0, start))
    return KVCache(k, v, jax.lax.dynamic_update_slice(cache.valid, valid_row, (row, 0)), cache.index)


@functools.partial(jax.jit, donate_argnames=("cache",))
def shift_cache(cache: KVCache, shift: jax.Array, starts: jax.Array) -> KVCache:
    """Move every row by `shift` slots (negative: towards slot 0) and the index with them.
    starts: int32[B], the first slot of each row's tokens (= index for a free row); slots outside
    [start + shift, index + shift) become invalid, so nothing wraps around into view. The caller
    keeps every row inside [0, S)."""
    k, v = jnp.roll(cache.k, shift, axis=2), jnp.roll(cache.v, shift, axis=2)
    index = cache.index + shift
    slots = jnp.arange(cache.valid.shape[1])[None]
    kept = (slots >= starts[:, None] + shift) & (slots < index)
    return KVCache(k, v, jnp.roll(cache.valid, shift, axis=1) & kept, index)


class Generator:
    """Generation for one model. The compiled programs are keyed by the model's structure
    (graphdef) and the shapes, so every Generator of the same architecture shares them; the
    parameters are those of the model when the Generator was made. A model family with other
    prompt inputs overrides `pad_prompt` and `prefill` (inference/generate_molmo2.py)."""

    def __init__(self, model: Molmo):
        self.graphdef, self.state = nnx.split(model)

    def pad_prompt(self, batch: Mapping[str, np.ndarray], length: int) -> dict:
        """The batch's prompt arrays with input_ids right-padded (-1) to `length`, checked."""
        return pad_prompt(batch, length)

    def prefill(self, prompt, key, temperature, top_p, *, cache_len, greedy, top_k):
        """-> (first new token int32[B], cache, its position int32[B], its logits [B, V])."""
        return prefill(self.graphdef, self.state, prompt, key, temperature, top_p, cache_len=cache_len,
                       greedy=greedy, top_k=top_k)

    def __call__(self, batch: Mapping[str, np.ndarray], config: GenerationConfig = GenerationConfig(),
                 decode: Optional[Callable[[Sequence[int]], str]] = None, *,
                 return_logits: bool = False) -> GenerationOutput:
        """Generate for a right-padded batch (see module docstring). `decode(ids) -> str` is needed
        for stop strings and fills `texts`. With return_logits the output also has `logits`
        float32[B, N, V] (the distribution each new token was drawn from)."""
        if config.stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function (token ids -> text)")
        length = np.asarray(batch["input_ids"]).shape[1]
        prompt = self.pad_prompt(batch, prompt_bucket(length))
        # Decode steps feed one token each: max_new_tokens - 1 of them after the prefill's token.
        cache_len = prompt["input_ids"].shape[1] + max(1, config.max_new_tokens - 1)
        greedy = config.temperature == 0
        sampling = dict(greedy=greedy, top_k=config.top_k)
        temperature, top_p = jnp.float32(max(config.temperature, 1e-6)), jnp.float32(config.top_p)
        key = jax.random.key(config.seed)

        key, sub = jax.random.split(key)
        token, cache, position, logits = self.prefill(prompt, sub, temperature, top_p, cache_len=cache_len,
                                                      **sampling)
        tokens = [np.asarray(token)[:, None]]
        all_logits = [np.asarray(logits)[:, None]] if return_logits else []
        stop_ids = np.asarray(config.stop_token_ids, np.int32)
        while (done := sum(t.shape[1] for t in tokens)) < config.max_new_tokens:
            if self._finished(np.concatenate(tokens, 1), stop_ids, config.stop_strings, decode).all():
                break
            key, sub = jax.random.split(key)
            steps = min(config.chunk_size, config.max_new_tokens - done)
            chunk, logits, cache, position = decode_steps(self.graphdef, self.state, token, cache, position,
                                                          sub, temperature, top_p, steps=steps,
                                                          keep_logits=return_logits, **sampling)
            token = chunk[:, -1]
            tokens.append(np.asarray(chunk))
            if return_logits:
                all_logits.append(np.asarray(logits))
        tokens = np.concatenate(tokens, 1)[:, :config.max_new_tokens]
        tokens = self._cut_at_stop(tokens, stop_ids)
        out = GenerationOutput(tokens)
        if decode is not None:
            out.texts = [self.cut_text(decode([t for t in row if t >= 0]), config.stop_strings) for row in tokens]
        if return_logits:
            out.logits = np.concatenate(all_logits, 1)[:, :config.max_new_tokens]
        return out

    @staticmethod
    def _cut_at_stop(tokens: np.ndarray, stop_ids: np.ndarray) -> np.ndarray:
        """Replace the first stop token of each row and everything after it by -1."""
        is_stop = np.isin(tokens, stop_ids)
        after = np.cumsum(is_stop, axis=1) > 0
        return np.where(after, -1, tokens).astype(np.int32)

    @staticmethod
    def cut_text(text: str, stop_strings: Sequence[str]) -> str:
        """`text` up to the first stop string in it."""
        cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
        return text[:cut]

    @classmethod
    def _finished(cls, tokens, stop_ids, stop_strings, decode) -> np.ndarray:
        """bool[B]: the row produced a stop token or (decoded) contains a stop string."""
        done = np.isin(tokens, stop_ids).any(axis=1)
        if stop_strings:
            cut = cls._cut_at_stop(tokens, stop_ids)
            for row in np.flatnonzero(~done):
                text = decode([t for t in cut[row] if t >= 0])
                done[row] = any(s in text for s in stop_strings)
        return done
