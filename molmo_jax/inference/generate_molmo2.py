"""Generation for Molmo2 models: the Generator of generate.py (prefill once, decode in chunks,
stop tokens and strings) with Molmo2's prompt inputs.

    generator = Molmo2Generator(model)
    out = generator(batch, GenerationConfig(max_new_tokens=12, stop_token_ids=(eos,)))

`batch` holds numpy arrays: input_ids int32[B, L] (-1 = right padding), and optionally
pixel_values float32[N, P, D] with token_pooling int[M, K] (transformers' image_token_pooling or
video_token_pooling: every crop / frame of the batch, indices into its N*P patches) and
mm_token_type_ids int[B, L] (1 = image / frame token: those attend to each other both ways in
the prefill, as in transformers). Positions count the valid tokens (0, 1, ...), the same for
the prompt and the generated tokens.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.inference.generate import Generator, first_token
from molmo_jax.model.attention import default_positions
from molmo_jax.model.molmo2 import check_placeholders


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy", "top_k"))
def prefill(graphdef, state, prompt, key, temperature, top_p, *, cache_len, greedy, top_k):
    """-> (first new token int32[B], cache, position of that token int32[B], logits [B, V])."""
    model = nnx.merge(graphdef, state)
    ids = prompt["input_ids"]
    valid = ids != -1
    embeds = model.embed(ids, prompt.get("pixel_values"), prompt.get("token_pooling"))
    mm = prompt.get("mm_token_type_ids")
    block_ids = None if mm is None else (mm == 1).astype(jnp.int32)
    cache = model.llm.init_cache(ids.shape[0], cache_len)
    logits, cache, _ = model.llm(embeds, default_positions(ids), token_valid=valid, cache=cache, block_ids=block_ids)
    return first_token(logits, valid, cache, key, temperature, top_p, greedy=greedy, top_k=top_k)


class Molmo2Generator(Generator):
    def __init__(self, model):
        super().__init__(model)
        self.image_patch_id = model.config.image_patch_id

    def pad_prompt(self, batch: Mapping[str, np.ndarray], length: int) -> dict:
        ids = np.asarray(batch["input_ids"], np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be int[B, L], got shape {ids.shape}")
        pad = ((0, 0), (0, length - ids.shape[1]))
        prompt = {"input_ids": np.pad(ids, pad, constant_values=-1)}
        if batch.get("mm_token_type_ids") is not None:
            mm = np.asarray(batch["mm_token_type_ids"], np.int32)
            if mm.shape != ids.shape:
                raise ValueError(f"mm_token_type_ids {mm.shape} and input_ids {ids.shape} differ in shape")
            prompt["mm_token_type_ids"] = np.pad(mm, pad)
        if batch.get("pixel_values") is not None:
            if batch.get("token_pooling") is None:
                raise ValueError("batch has pixel_values but no 'token_pooling'")
            prompt.update(pixel_values=np.asarray(batch["pixel_values"], np.float32),
                          token_pooling=np.asarray(batch["token_pooling"], np.int32))
            check_placeholders(ids == self.image_patch_id, prompt["token_pooling"])
        return prompt

    def prefill(self, prompt, key, temperature, top_p, *, cache_len, greedy, top_k):
        return prefill(self.graphdef, self.state, prompt, key, temperature, top_p, cache_len=cache_len,
                       greedy=greedy, top_k=top_k)
