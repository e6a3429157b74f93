"""The programs `python -m molmo_jax.tools.aot` compiles, as (jitted function, abstract
arguments): nothing is allocated, the arrays are ShapeDtypeStructs carrying their shardings.

  train    the trainer's update step (molmo_jax.train.trainer.make_train_step: dropout,
           gradient accumulation, AdamW groups), state sharded as train() shards it.
  eval     the same loss without dropout, gradient or optimizer state
           (trainer.make_eval_step), on the same param shardings and global batch.
  prefill  generation's prefill (molmo_jax.inference.generate.prefill): image encoding and the
           prompt written into a fresh KV cache, greedy first token.
  decode   generation's decode step (generate.decode_steps, one token), on the cache and
           shardings the compiled prefill returns.

The batch is split over the batch axes (sharding.batch_sharding) as the trainer splits it;
generation takes the trainer's param shardings too, so one mesh serves all programs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from molmo_jax.model import flops, sharding
from molmo_jax.inference import generate
from molmo_jax.model.config import MolmoConfig
from molmo_jax.train import families, optimizer as opt_lib, trainer

PROMPT_KEYS = ("input_ids", "images", "image_masks", "image_input_idx")


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted function and what to lower it with; `tokens`: tokens it processes (for
    FLOPs per token); `shape`: the geometry, in words."""

    name: str
    fn: Callable
    args: tuple
    static: Dict[str, Any]
    analytic_flops: float
    tokens: int
    shape: str

    def lower(self):
        return self.fn.lower(*self.args, **self.static)


def abstract_batch(cfg: MolmoConfig, mesh, batch: int, seq_len: int, crops: int) -> dict:
    """ShapeDtypeStructs of one Molmo global batch of `batch` rows of `seq_len` tokens and
    `crops` crops, split over the batch axes (sharding.batch_sharding, what the trainer uses)."""
    return _sharded(families.molmo_batch_shapes(cfg, batch, seq_len, crops), mesh)


def _sharded(shapes: Dict[str, tuple], mesh) -> dict:
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in shapes.items()}


def _global_batch(exp, cfg, mesh) -> dict:
    """The experiment's global batch as its model family's pipeline emits it."""
    return _sharded(families.family_of(exp).batch_shapes(cfg, exp, exp.train.global_batch), mesh)


def _geometry(exp) -> tuple:
    from data_pipelines.pipeline import crops_per_row
    return exp.train.global_batch, exp.data.seq_len, crops_per_row(exp)


def _shape(exp) -> str:
    return f"batch {exp.train.global_batch} x {families.family_of(exp).describe(exp)}"


def train_program(exp, cfg: MolmoConfig, setup: trainer.TrainSetup, mesh) -> Program:
    """The trainer's jitted step (setup.step_fn, state donated) on setup.abstract_state."""
    family, batch = families.family_of(exp), exp.train.global_batch
    return Program("train", setup.step_fn, (setup.abstract_state, _global_batch(exp, cfg, mesh)),
                   {}, families.step_flops(family, cfg, exp, batch), batch * exp.data.seq_len,
                   f"{_shape(exp)}, grad accum {exp.train.grad_accum_steps}")


def eval_program(exp, cfg: MolmoConfig, setup: trainer.TrainSetup, mesh) -> Program:
    """trainer.make_eval_step on the trainer's params (trainable and frozen) and global batch."""
    family, batch = families.family_of(exp), exp.train.global_batch
    state = setup.abstract_state
    fn = jax.jit(trainer.make_eval_step(setup.graphdef, exp))
    args = (state["params"], state["frozen"], _global_batch(exp, cfg, mesh))
    return Program("eval", fn, args, {}, family.forward_flops(cfg, exp, batch)["total"],
                   batch * exp.data.seq_len, _shape(exp))


def _sampling_args(mesh) -> tuple:
    """(key, temperature, top_p), replicated: the sampling inputs of prefill / decode_steps."""
    replicated = NamedSharding(mesh, P())
    key = jax.eval_shape(jax.random.key, 0)
    return (jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))


def _params(setup: trainer.TrainSetup) -> Dict:
    return opt_lib.merge_trees(setup.abstract_state["params"], setup.abstract_state["frozen"])


def prefill_program(exp, cfg: MolmoConfig, setup: trainer.TrainSetup, mesh, prompt_len: int,
                    cache_len: int) -> Program:
    """Greedy prefill of global-batch prompts of `prompt_len` tokens with the config's crops,
    into a cache of `cache_len` slots."""
    batch, _, crops = _geometry(exp)
    full = abstract_batch(cfg, mesh, batch, prompt_len, crops)
    prompt = {k: full[k] for k in PROMPT_KEYS}
    args = (setup.graphdef, _params(setup), prompt) + _sampling_args(mesh)
    analytic = flops.forward_flops(cfg, batch, prompt_len, crops, kv_len=cache_len)["total"]
    return Program("prefill", generate.prefill, args, dict(cache_len=cache_len, greedy=True, top_k=0), analytic,
                   batch * prompt_len, f"batch {batch}, prompt {prompt_len} tokens + {crops} crops, "
                   f"cache {cache_len} slots")


def decode_program(cfg: MolmoConfig, setup: trainer.TrainSetup, mesh, prefill_compiled) -> Program:
    """One greedy decode step (decode_steps with steps=1, cache donated) on what the compiled
    prefill returns: its first token, cache and positions, with the shardings it gives them."""
    outputs = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
                           prefill_compiled.out_info, prefill_compiled.output_shardings)
    token, cache, position, _ = outputs
    batch, cache_len = token.shape[0], cache.valid.shape[1]
    key, temperature, top_p = _sampling_args(mesh)
    args = (setup.graphdef, _params(setup), token, cache, position, key, temperature, top_p)
    analytic = flops.forward_flops(cfg, batch, 1, 0, kv_len=cache_len)["total"]
    return Program("decode", generate.decode_steps, args, dict(steps=1, greedy=True, top_k=0, keep_logits=False),
                   analytic, batch, f"batch {batch}, 1 token, cache {cache_len} slots (arguments leave out the "
                   "ViT and connector params: jit drops what the step does not read)")
