"""The training loop: one function, read top to bottom.

    python -m molmo_jax.train --config=configs/demo.py:pretrain --workdir=/path/to/run

Sections: config checks -> devices and workdir lock -> mesh and model config -> input pipeline
-> model, optimizer, shardings -> init or resume -> update step -> loop (log one step late,
checkpoint, preemption, NaN guard). Resuming is automatic: when `<workdir>/checkpoints` holds a
checkpoint that fits the model and passes its checks (checkpointing.py), the run continues from
it (params, optimizer, step, RNG and data iterator), bit-exactly on CPU. A config error, a
checkpoint of another model or a workdir held by another trainer stops the run before it
compiles or writes anything.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from molmo_jax.convert import hf_backbones
from molmo_jax.convert.hf_folder import HFTensors
from molmo_jax.convert.links import CheckpointError
from molmo_jax.model import lora, sharding
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.models import build_model
from molmo_jax.model.molmo import Molmo
from molmo_jax.train import families, loss as loss_lib
from molmo_jax.train import optimizer as opt_lib
from molmo_jax.train.checkpointing import (Checkpointer, CheckpointMismatchError, NonFiniteStateError,
                                           PreemptionWatcher, tree_fingerprint)
from molmo_jax.train.config_checks import ConfigError, validate
from molmo_jax.train.metrics_logging import MetricsLogger
from molmo_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)

# Batch keys a model consumes (besides the loss targets), of every family (train/families.py);
# any absent key is simply not passed.
MODEL_INPUTS = families.ALL_INPUTS
TARGETS = ("target_tokens", "loss_masks")
LORA_DROPOUT_STREAM = 1  # fold_in of a step's dropout key that LoRA dropout draws from


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient norm became NaN/inf; the run stops without saving that state."""


def model_config_from(config: ml_collections.ConfigDict) -> families.ModelConfig:
    """The typed model config of config.model_family (MolmoConfig or Molmo2Config), built once
    from config.model (unknown keys raise)."""
    return families.model_config_of(families.family_of(config), config.model.to_dict(), jax.default_backend())


def lora_config_from(config: ml_collections.ConfigDict) -> lora.LoraConfig:
    """The typed LoRA config (rank 0: full fine-tuning)."""
    return lora.LoraConfig.from_dict(config.lora.to_dict())


def frozen_regex_of(config: ml_collections.ConfigDict) -> str:
    """The parameters that get no gradient: config.optimizer.frozen, or all but the adapters."""
    return lora.FROZEN_BASE if lora_config_from(config).enabled else config.optimizer.frozen


def _opt_state_shardings(abstract_opt_state: Any, param_shardings: Dict, mesh) -> Any:
    """Optimizer moments take the sharding of the parameter whose path ends their path;
    scalars (counts, learning rates) are replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[tuple(k.key for k in path)] = s
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def loss_batch(batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """The model inputs and loss targets of a batch; padding's loss weight -1 (official
    collator) becomes 0, as the official loss zeroes it too."""
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS + TARGETS}
    batch["loss_masks"] = jnp.maximum(batch["loss_masks"].astype(jnp.float32), 0.0)
    return batch


def token_loss_sums(model: Molmo, batch: Dict[str, jax.Array], z_loss_weight: float,
                    dropout_key: Optional[jax.Array] = None, ce_chunk: int = 0) -> Tuple[Dict[str, jax.Array], Dict]:
    """The training loss's forward pass: (loss_lib.weighted_token_losses sums, the model's FFN
    aux dict). batch: loss_batch's arrays; dropout_key None = deterministic (evaluation);
    ce_chunk > 0: the cross-entropy `ce_chunk` tokens at a time (loss_lib.chunked_token_losses,
    config.train.ce_chunk_tokens), never holding the whole [B, L, V] logits."""
    inputs = families.family_of_model(model.config).model_kwargs(batch)
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    if dropout_key is not None:  # its own stream: the residual dropout's draws stay as they were
        lora.set_dropout_keys(model, jax.random.fold_in(dropout_key, LORA_DROPOUT_STREAM))
    out, aux = model(**inputs, response_mask=batch["loss_masks"] > 0, deterministic=dropout_key is None,
                     rngs=rngs, return_aux=True, return_hidden=ce_chunk > 0)
    if ce_chunk > 0:
        return loss_lib.chunked_token_losses(out, model.llm.head_kernel(), batch["target_tokens"],
                                             batch["loss_masks"], z_loss_weight, ce_chunk), aux
    return loss_lib.weighted_token_losses(out, batch["target_tokens"], batch["loss_masks"], z_loss_weight), aux


def loss_metrics(sums: Dict[str, jax.Array], global_weight: jax.Array) -> Dict[str, jax.Array]:
    """Per-token means of the summed token losses over the global batch."""
    denom = jnp.maximum(global_weight, 1.0)
    return {"loss": (sums["ce_sum"] + sums["z_sum"]) / denom, "ce_loss": sums["ce_sum"] / denom,
            "z_loss": sums["z_sum"] / denom, "accuracy": sums["correct_sum"] / denom,
            "loss_tokens": global_weight}


def make_eval_step(graphdef, config: ml_collections.ConfigDict) -> Callable:
    """(params, frozen, batch) -> metrics: the training loss without dropout, gradient or update
    (the whole global batch at once)."""
    z_weight, ce_chunk = config.train.z_loss_weight, int(config.train.get("ce_chunk_tokens", 0))

    def eval_step(params, frozen, batch):
        batch = loss_batch(batch)
        model = nnx.merge(graphdef, opt_lib.merge_trees(params, frozen))
        sums, _ = token_loss_sums(model, batch, z_weight, ce_chunk=ce_chunk)
        return loss_metrics(sums, jnp.sum(batch["loss_masks"]))

    return eval_step


def make_train_step(graphdef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    accum_steps: int) -> Callable:
    """(state, batch) -> (state, metrics). batch: global arrays, leading dim = global batch."""
    patterns = [tuple(p) for p in config.optimizer.groups]
    z_weight, ce_chunk = config.train.z_loss_weight, int(config.train.get("ce_chunk_tokens", 0))

    def micro_loss(params, frozen, mb, key, global_weight):
        model = nnx.merge(graphdef, opt_lib.merge_trees(params, frozen))
        sums, aux = token_loss_sums(model, mb, z_weight, dropout_key=key, ce_chunk=ce_chunk)
        loss = loss_lib.normalised_loss(sums, global_weight)
        llm = model.config.llm
        if llm.block_type == "moe":  # official releases use weight 0 for both
            loss = loss + (llm.moe_load_balance_weight * aux["load_balance_loss"]
                           + llm.moe_router_z_weight * aux["router_z_loss"]) / accum_steps
        return loss, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        batch = loss_batch(batch)
        global_weight = jnp.sum(batch["loss_masks"])
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if accum_steps == 1:
            (_, sums), grads = grad_fn(state["params"], state["frozen"], batch, step_key, global_weight)
        else:
            # Micro-batch i takes rows i, i+A, i+2A, ...: each device keeps its own rows, no resharding.
            def split(x):
                x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            def body(carry, xs):
                mb, i = xs
                (_, s), g = grad_fn(state["params"], state["frozen"], mb, jax.random.fold_in(step_key, i),
                                    global_weight)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero = (jax.tree.map(jnp.zeros_like, state["params"]),
                    {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "weight_sum", "correct_sum")})
            (grads, sums), _ = jax.lax.scan(body, zero, (jax.tree.map(split, batch), jnp.arange(accum_steps)))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = loss_metrics(sums, global_weight)
        metrics.update({f"grad_norm.{g}": n for g, n in opt_lib.group_grad_norms(grads, patterns).items()})
        metrics.update({f"lr.{g}": lr for g, lr in opt_lib.learning_rates(opt_state).items()})
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        return new_state, metrics

    return train_step


def init_train_state(model_cfg: families.ModelConfig, lora_cfg: lora.LoraConfig, tx: optax.GradientTransformation,
                     frozen_regex: str, key: jax.Array) -> Dict[str, Any]:
    """The step-0 training state: params split into trainable / frozen, optimizer state, RNG.
    With LoRA the base draws the same init as without, and the adapters are drawn after it."""
    params_key, rng_key = jax.random.split(key)
    model = families.family_of_model(model_cfg).build(model_cfg, lora_cfg, rngs=nnx.Rngs(params=params_key))
    trainable, frozen = opt_lib.split_trainable(nnx.to_pure_dict(nnx.state(model)), frozen_regex)
    return {"params": trainable, "frozen": frozen, "opt_state": tx.init(trainable),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng_key)}


class TrainSetup(NamedTuple):
    """Everything the loop needs about the model and optimizer on one mesh.

    init: jitted key -> sharded step-0 state; step_fn: jitted (state, batch) -> (state, metrics),
    donating the state; abstract_state: ShapeDtypeStructs with their target shardings.
    """
    graphdef: Any
    tx: optax.GradientTransformation
    init: Callable
    step_fn: Callable
    abstract_state: Dict[str, Any]
    shardings: Dict[str, Any]


def build_train_setup(config: ml_collections.ConfigDict, model_cfg: families.ModelConfig, mesh) -> TrainSetup:
    """Shards the model by its logical axis names, builds the optimizer and the jitted step."""
    lora_cfg = lora_config_from(config)
    build = families.family_of_model(model_cfg).build
    abstract_model = nnx.eval_shape(lambda: build(model_cfg, lora_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    specs = sharding.state_specs(abstract_params, mesh)
    sharding.check_sharded_enough(abstract_params, specs, mesh, config.sharding.max_replicated_fraction)
    param_shardings = nnx.to_pure_dict(sharding.named_shardings(specs, mesh))
    frozen_regex = frozen_regex_of(config)
    trainable_sh, frozen_sh = opt_lib.split_trainable(param_shardings, frozen_regex)
    tx = opt_lib.make_optimizer(config.optimizer, config.train.total_steps,
                                [tuple(p) for p in config.optimizer.groups])

    init_state = functools.partial(init_train_state, model_cfg, lora_cfg, tx, frozen_regex)
    abstract_state = jax.eval_shape(init_state, jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    shardings = {"params": trainable_sh, "frozen": frozen_sh,
                 "opt_state": _opt_state_shardings(abstract_state["opt_state"], trainable_sh, mesh),
                 "step": replicated, "rng": replicated}
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, shardings)
    step_fn = jax.jit(make_train_step(graphdef, tx, config, config.train.grad_accum_steps), donate_argnums=(0,),
                      out_shardings=(shardings, replicated))
    return TrainSetup(graphdef, tx, jax.jit(init_state, out_shardings=shardings), step_fn, abstract_state, shardings)


def _last_good(last_good: Optional[int], ckpt_dir: str) -> str:
    return f"the last good checkpoint is step {last_good} in {ckpt_dir}" if last_good else "no checkpoint was kept"


def _check_finite(step: int, metrics: Dict[str, float], last_good: Optional[int], ckpt_dir: str) -> None:
    bad = {k: v for k, v in metrics.items() if (k == "loss" or k.startswith("grad_norm.")) and not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f"non-finite training metrics at step {step}: {bad}; stopping, "
                                 f"{_last_good(last_good, ckpt_dir)}")


def train(config: ml_collections.ConfigDict, workdir: str, *,
          data_iterator: Optional[Iterator[Dict[str, np.ndarray]]] = None,
          devices: Optional[List[Any]] = None) -> List[Dict[str, float]]:
    """Trains until config.train.total_steps (or SIGTERM). Returns this run's per-step metrics.

    data_iterator: this process's numpy batches, a grain DatasetIterator (get_state/set_state);
      by default the pipeline of config.data (data_pipelines.pipeline.make_pipeline).
    devices: the devices of the mesh (default: all).
    """
    # ------------------------------------------------------------------ config, devices, mesh
    validate(config)
    sharding.initialize_distributed(config.distributed)
    try:  # what only the devices can tell: the mesh, and whether the model and batch fit it
        mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
        model_cfg = model_config_from(config)
        sharding.validate_parallelism(model_cfg, dict(mesh.shape), config.train.global_batch,
                                      config.train.grad_accum_steps, jax.process_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    log.info("mesh %s on %d devices, %d processes; compute dtype %s", dict(mesh.shape), mesh.size,
                 jax.process_count(), model_cfg.dtype)
    lock = WorkdirLock(workdir)
    lock.acquire()  # before anything reads or writes the workdir
    try:
        return _train(config, workdir, mesh, model_cfg, data_iterator)
    finally:
        lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh, model_cfg: families.ModelConfig,
           data_iterator: Optional[Iterator]) -> List[Dict[str, float]]:
    tc = config.train
    # ------------------------------------------------------------------ input pipeline
    family = families.family_of(config)
    own_iterator = data_iterator is None
    if own_iterator:
        data_iterator = iter(family.make_pipeline(config, process_index=jax.process_index(),
                                                  process_count=jax.process_count()))

    # ------------------------------------------------------------------ model, optimizer, shardings
    setup = build_train_setup(config, model_cfg, mesh)
    abstract_state = setup.abstract_state

    # ------------------------------------------------------------------ init or resume
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    checkpointer = Checkpointer(ckpt_dir, keep=config.checkpoint.keep, keep_every=config.checkpoint.keep_every,
                                async_save=config.checkpoint.async_save)
    lora_cfg = lora_config_from(config)
    try:
        if lora_cfg.enabled:  # the base is rebuilt (never saved), so that resuming can check it
            fresh, lora_meta = lora_initial_state(config, model_cfg, setup)
        restored = checkpointer.restore_latest(saved_part(abstract_state, lora_cfg), data_iterator,
                                               model_config=model_cfg.to_dict())
        if restored is not None:
            start_step, state, meta = restored
            if lora_cfg.enabled:
                _check_lora_base(meta.get("lora"), lora_meta, f"{ckpt_dir}/{start_step}")
                state = dict(state, frozen=fresh["frozen"])
            log.info("resumed from step %d of %s", start_step, ckpt_dir)
        else:
            start_step = 0
            state = fresh if lora_cfg.enabled else initial_state(config, model_cfg, setup)
    except BaseException:
        checkpointer.close()
        if own_iterator:
            data_iterator.close()
        raise
    last_good = start_step or None  # a restored checkpoint passed its checksums and finiteness check

    # ------------------------------------------------------------------ metrics, preemption
    batch_tokens = tc.global_batch * config.data.seq_len
    logger = MetricsLogger(workdir, total_steps=tc.total_steps, every=config.log.every,
                           tensorboard=config.log.tensorboard,
                           flops_per_step=families.step_flops(family, model_cfg, config, tc.global_batch),
                           examples_per_step=tc.global_batch, tokens_per_step=batch_tokens)
    preemption = PreemptionWatcher(checkpointer)
    # Recorded in every checkpoint, so `python -m molmo_jax.export` needs no --tokenizer.
    tokenizer = os.path.abspath(config.data.tokenizer) if config.data.tokenizer else ""

    # ------------------------------------------------------------------ loop
    history: List[Dict[str, float]] = []
    pending: Optional[Tuple[int, Dict]] = None  # (step, device metrics) not yet read
    try:
        for step in range(start_step + 1, tc.total_steps + 1):
            host_batch = next(data_iterator)
            # Examples in the global batch (rows may pack several; each starts at position 0).
            examples = int(np.sum(np.asarray(host_batch["position_ids"]) == 0)) * jax.process_count() \
                if "position_ids" in host_batch else tc.global_batch
            batch = sharding.make_global_batch(_model_batch(host_batch, family), mesh)
            # Under the mesh, the model's activation constraints (sharding.with_logical_constraint:
            # batch-sharded block inputs) take effect when the step is traced; outside they are no-ops.
            with jax.set_mesh(mesh):
                state, metrics = setup.step_fn(state, batch)
            if pending is not None:  # read step-1 now that step is queued behind it
                history.append(logger.write(*pending))
                _check_finite(pending[0], history[-1], last_good, ckpt_dir)
            # MFU counts the real tokens and crops of the step, not the padding (all processes alike).
            flops = family.useful_step_flops(model_cfg, host_batch)
            pending = (step, metrics, examples, flops * jax.process_count())
            stop = preemption.should_stop(step)
            if stop or step % config.checkpoint.every == 0 or step == tc.total_steps:
                history.append(logger.write(*pending))
                pending = None
                _check_finite(step, history[-1], last_good, ckpt_dir)
                try:
                    checkpointer.save(step, saved_part(state, lora_cfg), data_iterator,
                                      {"step": step, "model_family": family.name, "model": model_cfg.to_dict(),
                                       "mesh": dict(mesh.shape),
                                       "tokenizer": tokenizer, **family.data_meta(config),
                                       **({"lora": lora_meta} if lora_cfg.enabled else {})})
                except NonFiniteStateError as e:
                    raise NonFiniteLossError(f"{e}; stopping, {_last_good(last_good, ckpt_dir)}") from None
                last_good = step
                logger.pause()
            if stop:
                log.warning("stopping at step %d after SIGTERM; checkpoint saved in %s", step, ckpt_dir)
                break
        if pending is not None:
            history.append(logger.write(*pending))
            _check_finite(pending[0], history[-1], last_good, ckpt_dir)
    finally:
        if own_iterator:
            data_iterator.close()
        checkpointer.close()
        logger.close()
        preemption.restore_handler()
    return history


def saved_part(state: Dict, lora_cfg: lora.LoraConfig) -> Dict:
    """What a checkpoint holds of the training state: all of it, or with LoRA all but the
    frozen base (rebuilt from config.init.checkpoint / the seed on resume)."""
    return {k: v for k, v in state.items() if k != "frozen"} if lora_cfg.enabled else state


def lora_initial_state(config: ml_collections.ConfigDict, model_cfg: families.ModelConfig, setup: TrainSetup
                       ) -> Tuple[Dict, Dict]:
    """(step-0 state, "lora" meta) of a LoRA run: fresh adapters and optimizer state on the base
    of config.init.checkpoint (or the random init of config.seed). The meta entry, saved with
    every checkpoint, records the LoRA config and the base: its path, step and fingerprint
    (checkpointing.tree_fingerprint of the frozen base as the run holds it)."""
    init, lora_cfg = config.init, lora_config_from(config)
    if init.vit or init.llm:
        raise ValueError("config.lora trains adapters on a whole Molmo: give its base as config.init.checkpoint "
                         f"(a run's checkpoints, or `python -m molmo_jax.import_hf` output), not config.init.vit "
                         f"/ .llm (got {init.vit!r}, {init.llm!r})")
    state = setup.init(jax.random.key(config.seed))
    base, base_step = f"random init, seed {config.seed}", None
    if init.checkpoint:
        base = os.path.abspath(init.checkpoint)
        base_step, state["frozen"] = _load_lora_base(base, model_cfg, lora_cfg, setup.shardings["frozen"])
    return state, {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "dropout": lora_cfg.dropout,
                   "targets": list(lora_cfg.targets),
                   "base_dtype": lora_cfg.base_dtype, "base": base, "base_step": base_step,
                   "base_fingerprint": tree_fingerprint(state["frozen"])}


def _check_lora_base(saved: Optional[Dict], current: Dict, where: str) -> None:
    """Adapters resume only on the base (and base_dtype) they were trained on."""
    keys = ("base_fingerprint", "base_dtype")
    if saved is None or any(saved.get(k) != current[k] for k in keys):
        had = ("no LoRA base (a full fine-tuning checkpoint)" if saved is None else
               f"base {saved.get('base')} ({saved.get('base_dtype')}, fingerprint {saved.get('base_fingerprint')})")
        raise CheckpointMismatchError(
            f"checkpoint {where} holds adapters of another base: it records {had}, this run's base is "
            f"{current['base']} ({current['base_dtype']}, fingerprint {current['base_fingerprint']}). Nothing was "
            "changed: set config.init.checkpoint / config.seed / config.lora.base_dtype to the adapters' base, "
            "or use another workdir")


def _model_batch(batch: Dict[str, np.ndarray], family: families.Family) -> Dict[str, np.ndarray]:
    missing = [k for k in ("input_ids",) + TARGETS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; it has {sorted(batch)}")
    return {k: v for k, v in batch.items() if k in family.inputs + TARGETS}


def initial_state(config: ml_collections.ConfigDict, model_cfg: families.ModelConfig, setup: TrainSetup) -> Dict:
    """The step-0 state of a run without checkpoints: random init (config.seed), then the params
    of config.init.checkpoint, or the ViT / LLM of config.init.vit / config.init.llm."""
    init = config.init
    if init.checkpoint and (init.vit or init.llm):
        raise ValueError(f"config.init.checkpoint={init.checkpoint!r} replaces every parameter; leave "
                         f"config.init.vit / config.init.llm empty (got {init.vit!r}, {init.llm!r})")
    if lora_config_from(config).enabled:
        return lora_initial_state(config, model_cfg, setup)[0]
    if init.checkpoint:  # read (and checked against the model) before anything is compiled
        params = _load_initial_params(init.checkpoint, setup.abstract_state, model_cfg)
        return dict(setup.init(jax.random.key(config.seed)), **params)
    state = setup.init(jax.random.key(config.seed))
    if init.vit or init.llm:
        return _load_backbones(init.vit, init.llm, model_cfg, state, config.optimizer.frozen)
    return state


def _load_backbones(vit_folder: str, llm_folder: str, model_cfg: MolmoConfig, state: Dict,
                    frozen_regex: str) -> Dict:
    """Stage-1 start (spec §5.2): the ViT and/or LLM of transformers checkpoint folders
    (convert/hf_backbones) replace their random init, on the shardings of `state`. The connector
    and `new_embedding` keep theirs; the fresh Adam moments are zeros whatever the params, so the
    optimizer state stays valid. Streamed: tensors are read one at a time (HFTensors) into one
    tower's float32 host arrays, each placed on its shardings and dropped before the next."""

    def place(current: Dict, new: Dict) -> Dict:
        out = dict(current)
        for k in list(new):
            v = new.pop(k)  # the host copy goes as soon as its global array exists
            if isinstance(v, dict):
                out[k] = place(current[k], v)
            else:
                host = np.asarray(v, current[k].dtype)
                # Waited for: a pending transfer keeps its host array alive, all of them at once.
                out[k] = jax.make_array_from_callback(host.shape, current[k].sharding,
                                                      lambda i, h=host: h[i]).block_until_ready()
            del v
        return out

    full = opt_lib.merge_trees(state["params"], state["frozen"])
    for key, folder, tower, convert, tower_cfg in (
            ("vit", vit_folder, "vision", hf_backbones.vision_params_from_hf, model_cfg.vision),
            ("llm", llm_folder, "llm", hf_backbones.llm_params_from_hf, model_cfg.llm)):
        if not folder:
            continue
        try:
            host = convert(HFTensors(folder), tower_cfg)
        except CheckpointError as e:
            raise CheckpointError(f"config.init.{key}={folder!r} does not fit config.model.{tower}: {e}") from e
        full = place(full, {tower: host})
        del host
        log.info("initial %s params from %s", tower, folder)
    params, frozen = opt_lib.split_trainable(full, frozen_regex)
    return dict(state, params=params, frozen=frozen)


def _load_lora_base(checkpoint_dir: str, model_cfg: families.ModelConfig, lora_cfg: lora.LoraConfig,
                    frozen_shardings: Dict) -> Tuple[int, Dict]:
    """(step, frozen base) of a LoRA run: every parameter of another run's latest usable
    checkpoint (opened read-only), in the base layout (lora.base_params: kernels in base_dtype)
    on `frozen_shardings`."""
    mesh = jax.tree.leaves(frozen_shardings)[0].mesh
    _, plain = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))
    plain_shardings = nnx.to_pure_dict(sharding.named_shardings(sharding.state_specs(plain, mesh), mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nnx.to_pure_dict(plain), plain_shardings)
    source = Checkpointer(checkpoint_dir, read_only=True)
    try:
        restored = source.restore_params(abstract, model_config=model_cfg.to_dict())
    finally:
        source.close()
    if restored is None:
        raise FileNotFoundError(f"config.init.checkpoint: no usable checkpoint in {checkpoint_dir}")
    step, params = restored
    log.info("LoRA base (%s) from step %d of %s", lora_cfg.base_dtype, step, checkpoint_dir)
    axes = lora.dense_shapes(model_cfg)
    return step, jax.jit(lambda p: lora.base_params(p, axes, lora_cfg.base_dtype),
                         out_shardings=frozen_shardings, donate_argnums=(0,))(params)


def _load_initial_params(checkpoint_dir: str, abstract_state: Dict, model_cfg: families.ModelConfig) -> Dict:
    """{"params", "frozen"} of another run's latest usable checkpoint (e.g. stage 1 for stage 2),
    opened read-only: nothing in that run is moved, cleaned up or written. Its optimizer state
    and step are not read; they stay fresh."""
    source = Checkpointer(checkpoint_dir, read_only=True)
    params_only = {k: abstract_state[k] for k in ("params", "frozen")}
    try:
        restored = source.restore_latest(params_only, None, partial=True, model_config=model_cfg.to_dict())
    finally:
        source.close()
    if restored is None:
        raise FileNotFoundError(f"config.init.checkpoint: no usable checkpoint in {checkpoint_dir}")
    step, loaded, _ = restored
    log.info("initial params from step %d of %s", step, checkpoint_dir)
    return {"params": loaded["params"], "frozen": loaded["frozen"]}
