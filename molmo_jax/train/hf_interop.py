"""Trainer checkpoints -> Hugging Face / PyTorch folders, streamed; HF folders -> trainer checkpoints.

    export_checkpoint("run/checkpoints", "out/", tokenizer="tok/")            # official Molmo layout
    export_checkpoint("run/checkpoints", "out/", fmt="torch-backbones")       # out/llm, out/vision
    import_hf("Molmo-7B-D-0924/", "ckpt/", train_config)                      # step-0 training state

Streaming: the tensors to write are planned from shapes alone (key, shape, shard, byte offset),
so every safetensors header is written before any data. The parameters are then read from the
orbax checkpoint one group at a time (the arrays that feed one fused tensor, e.g. q, k and v of
all layers; orbax partial restore into numpy, which also reassembles a checkpoint saved on any
mesh), converted, cast and appended to their shard (convert/safetensors_stream.py). Peak host
memory is about twice the largest group (orbax decodes into a buffer, then into numpy) plus one
tensor, not the model (benchmarks/export.py: ~0.5x one float32 copy at 1.1B parameters); the
optimizer state is never read. Formats: convert/export_formats.py.

Everything is written into a hidden temporary folder next to the target and renamed at the end,
so an interrupted or failed export (disk full, read-only target: one ExportError) leaves no
output folder; a non-empty target needs `force`. The folder's other files: the configs
(convert/export_formats.py), tokenizer and remote code (convert/export_files.py); --verify:
train/export_verify.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.multicrop import CropConfig
from data_pipelines.tokenizer import Tokenizer
from molmo_jax.convert import export_formats as formats
from molmo_jax.convert.export_files import AtomicFolder, copy_remote_code, write_tokenizer
from molmo_jax.convert.export_formats import ExportError
from molmo_jax.convert.hf_folder import HFTensors
from molmo_jax.convert.hf_molmo import abstract_params, config_to_hf, hf_to_params, molmo_links, read_hf_config
from molmo_jax.convert.links import CheckpointError, Path, get_path, has_path, leaves, set_path
from molmo_jax.convert.safetensors_stream import write_json, write_safetensors
from molmo_jax.inference.predictor import model_crop_config
from molmo_jax.model import lora, models, quantization
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.molmo2_config import Molmo2Config
from molmo_jax.train import families, optimizer as opt_lib
from molmo_jax.train.checkpointing import Checkpointer
from molmo_jax.train.export_verify import verify_export

log = logging.getLogger(__name__)

FORMATS = ("hf", "torch-backbones")
DTYPES = ("float32", "bfloat16")



def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1.5GiB' / '123' -> bytes (GB = 10^9 as in transformers)."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30}
    t = text.strip().upper()
    number = t.rstrip("KMGIB")
    try:
        size = int(float(number) * units[t[len(number):]])
    except (KeyError, ValueError):
        raise ExportError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise ExportError(f"--shard-size {text!r} must be positive")
    return size


def numpy_dtype(dtype: str):
    """'float32' / 'bfloat16' -> the numpy type (bfloat16 from ml_dtypes)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose from {DTYPES}")
    if dtype == "bfloat16":
        return ml_dtypes.bfloat16
    return np.float32


# ----------------------------------------------------------------------------- reading a checkpoint


def recorded_config(meta: Mapping, where: str):
    """The model config a checkpoint's meta records, of the family it names (models.recorded_config)."""
    try:
        return models.recorded_config(meta)
    except ValueError as e:
        raise ExportError(f"{where}: {e}") from None


class CheckpointParams:
    """Parameters of one train/checkpointing.Checkpointer step, read a few arrays at a time.

    The trainer stores params in state["params"] (trainable) and state["frozen"]; each of our
    parameter paths is found in one of them. `config` comes from the checkpoint's meta item.
    abstract: the parameters to find (default: every parameter of the plain model).
    """

    def __init__(self, directory: str, step: Optional[int] = None, abstract: Optional[Dict] = None):
        if not os.path.isdir(directory):
            raise ExportError(f"--checkpoint {directory}: not a folder")
        if os.path.isdir(os.path.join(directory, "checkpoints")):  # a run's workdir
            directory = os.path.join(directory, "checkpoints")
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        steps = sorted(self.manager.all_steps())
        if not steps:
            raise ExportError(f"--checkpoint {directory}: no finished checkpoint in it (expected <dir>/<step>/state "
                              f"as the trainer writes under <workdir>/checkpoints)")
        if step is not None and step not in steps:
            raise ExportError(f"--step {step}: {directory} has checkpoints of steps {steps}")
        self.step = steps[-1] if step is None else step
        self.meta = dict(self.manager.restore(self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        if "model" not in self.meta:
            raise ExportError(f"{directory}/{self.step}/meta: no 'model' config recorded")
        if abstract is None and "lora" in self.meta:
            raise ExportError(f"{directory} step {self.step} holds LoRA adapters only (its meta records 'lora'); "
                              "export them merged into their base with --merge-lora")
        self.config = recorded_config(self.meta, f"{directory}/{self.step}/meta")
        tree = self.manager.item_metadata(self.step)["state"].tree
        self.abstract = abstract_params(self.config) if abstract is None else abstract
        self.location: Dict[Path, Tuple[str, ...]] = {}
        for path, leaf in leaves(self.abstract):
            where = [k for k in ("params", "frozen") if has_path(tree.get(k, {}), path)]
            if not where:
                raise ExportError(f"{directory}/{self.step}/state: parameter {'/'.join(path)} is in neither "
                                  f"'params' nor 'frozen'")
            stored = get_path(tree[where[0]], path)
            if tuple(stored.shape) != tuple(leaf.shape):
                raise ExportError(f"{directory}/{self.step}/state: {where[0]}/{'/'.join(path)} has shape "
                                  f"{tuple(stored.shape)}, the recorded model config needs {tuple(leaf.shape)}")
            self.location[path] = (where[0],) + path

    def read(self, paths: Sequence[Path]) -> Dict[Path, np.ndarray]:
        """float32 numpy arrays of `paths`, whatever mesh the checkpoint was saved on."""
        item, restore_args = {}, {}
        for path in paths:
            set_path(item, self.location[path], 0)
            set_path(restore_args, self.location[path], ocp.RestoreArgs(restore_type=np.ndarray))
        state = self.manager.restore(self.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))["state"]
        return {path: np.asarray(get_path(state, self.location[path]), np.float32) for path in paths}

    def close(self) -> None:
        self.manager.close()


class LoraMergedParams:
    """The plain Molmo parameters a LoRA run's checkpoint stands for, read a few at a time, with
    CheckpointParams' interface (config, meta, step, abstract, read, close): the base (the
    checkpoint and step that meta "lora" records) with each Dense kernel as the run used it
    (stored in base_dtype, dequantized) plus scale * a . b of its adapter (model/lora.py)."""

    def __init__(self, directory: str, step: Optional[int] = None):
        probe = CheckpointParams(directory, step, abstract={})  # opens and reads the meta only
        info, config = probe.meta.get("lora"), probe.config
        probe.close()
        if info is None:
            raise ExportError(f"--merge-lora: {directory} step {probe.step} is not a LoRA checkpoint "
                              "(its meta records no 'lora')")
        if info.get("base_step") is None:
            raise ExportError(f"--merge-lora: the adapters of {directory} apply to a {info['base']} that no checkpoint "
                              "holds; only a base given as config.init.checkpoint can be merged")
        self.lora = lora.LoraConfig(rank=info["rank"], alpha=info["alpha"], targets=tuple(info["targets"]),
                                    base_dtype=info["base_dtype"])
        self.axes = lora.dense_shapes(config)
        self.adapted = lora.target_paths(list(self.axes), self.lora.targets)
        adapters, plain = {}, abstract_params(config)
        for module in self.adapted:
            path = tuple(module.split("/"))
            shape, n_in = get_path(plain, path + ("kernel",)).shape, self.axes[module][0]
            lead = len(shape) - n_in - self.axes[module][1]
            set_path(adapters, (*path, lora.ADAPTER, "a"),
                     jax.ShapeDtypeStruct((*shape[:lead + n_in], self.lora.rank), jnp.float32))
            set_path(adapters, (*path, lora.ADAPTER, "b"),
                     jax.ShapeDtypeStruct((*shape[:lead], self.lora.rank, *shape[lead + n_in:]), jnp.float32))
        self.adapters = CheckpointParams(directory, step, abstract=adapters)
        try:
            self.base = CheckpointParams(info["base"], info["base_step"])
        except ExportError as e:
            self.adapters.close()
            raise ExportError(f"--merge-lora: the base of {directory} ({info['base']}, step {info['base_step']}): "
                              f"{e}") from None
        if self.base.config != config:
            self.close()
            raise ExportError(f"--merge-lora: the base {info['base']} step {info['base_step']} is another model "
                              f"than the adapters' {directory} (config.model differs)")
        self.config, self.meta, self.step = config, self.adapters.meta, self.adapters.step
        self.abstract = self.base.abstract

    def read(self, paths: Sequence[Path]) -> Dict[Path, np.ndarray]:
        values = self.base.read(paths)
        modules = {"/".join(p[:-1]): p for p in paths if p[-1] == "kernel" and "/".join(p[:-1]) in self.axes}
        wanted = [(*m.split("/"), lora.ADAPTER, x) for m in modules if m in self.adapted for x in ("a", "b")]
        ab = self.adapters.read(wanted) if wanted else {}
        for module, path in modules.items():
            n_in, n_out = self.axes[module]
            kernel = quantization.dequantize(*quantization.quantize_kernel(
                jnp.asarray(values[path]), n_in, n_out, self.lora.base_dtype), jnp.float32)
            if module in self.adapted:
                a, b = (ab[(*module.split("/"), lora.ADAPTER, x)] for x in ("a", "b"))
                kernel = kernel + lora.adapter_delta(a, b, kernel.shape, n_in, self.lora.scale)
            values[path] = np.asarray(kernel, np.float32)
        return values

    def close(self) -> None:
        self.adapters.close()
        self.base.close()


# ----------------------------------------------------------------------------- folders


def checkpoint_crop(params: CheckpointParams) -> CropConfig:
    """The crop geometry the checkpoint was trained with (meta "crop", recorded by the trainer);
    checkpoints written before it was recorded get the geometry the model was built for at the
    release's max_crops 12, with a warning."""
    recorded = params.meta.get("crop")
    try:
        if recorded is None:
            log.warning("the checkpoint does not record its crop geometry (written by an older trainer); "
                        "preprocessor_config.json gets the release defaults for this ViT: max_crops 12")
            return model_crop_config(params.config, 12)
        return CropConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    except (TypeError, ValueError) as e:
        raise ExportError(f"checkpoint step {params.step} meta 'crop' {recorded}: {e}") from e


def special_ids(tok: Tokenizer, config: MolmoConfig) -> Dict[str, int]:
    """bos/eos/pad ids for a backbone config.json (pad = EOS, as the released tokenizers); an id
    outside the model's vocabulary (a tokenizer that is not the model's) is left out with a
    warning, since transformers refuses a padding row the embedding does not have."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    outside = {k: v for k, v in ids.items() if not 0 <= v < config.llm.embedding_size}
    if outside:
        log.warning("the tokenizer's %s lie outside the model's vocabulary of %d rows; not written to "
                    "llm/config.json (is it the tokenizer the model was trained with?)", outside,
                    config.llm.embedding_size)
    return {k: v for k, v in ids.items() if k not in outside}


def molmo2_folder(params: CheckpointParams, fmt: str, remote_code: Optional[str]) -> Dict:
    """export_checkpoint's folder plan of a Molmo2 checkpoint: transformers' Molmo2 layout
    (Molmo2ForConditionalGeneration loads it; molmo2_keys), config.json and, where the run's
    config.data.processor is a folder, its processor_config.json."""
    if fmt != "hf" or remote_code:
        raise ExportError("a Molmo2 checkpoint exports as --format hf (transformers' Molmo2 layout), without "
                          "--remote-code (transformers has Molmo2's code)")
    jsons = {"config.json": config_to_hf(params.config)}
    processor = params.meta.get("processor") or ""
    path = os.path.join(processor, "processor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            jsons["processor_config.json"] = json.load(f)
    else:
        log.warning("the run's processor %r is no folder with a processor_config.json; the export has none "
                    "(copy the processor files in to use it with predict)", processor)
    return {"": (molmo_links(params.config), jsons)}


def export_checkpoint(checkpoint: str, out: str, *, step: Optional[int] = None, fmt: str = "hf",
                      dtype: str = "float32", max_shard_bytes: int = 5 * 10 ** 9, tokenizer: Optional[str] = None,
                      remote_code: Optional[str] = None, force: bool = False,
                      verify: Optional[Callable[[Dict], None]] = None, merge_lora: bool = False,
                      on_shard_done: Callable[[str], None] = lambda name: None) -> str:
    """Exports one trainer checkpoint (the latest unless `step`) to `out`; returns `out`.

    fmt "hf": the official Molmo folder (config.json, generation_config.json,
      preprocessor_config.json and processor_config.json with the training crop geometry,
      tokenizer files, safetensors shards + index). remote_code: a folder with the official
      *_molmo.py files, copied in; auto_map then names them (loads offline) instead of the hub.
    fmt "torch-backbones": out/llm (Qwen2 / OLMo2 / OLMoE CausalLM, tokenizer files, the
      tokenizer's bos/eos/pad ids) and out/vision (CLIPVisionModel), each loadable with
      transformers' from_pretrained.
    tokenizer: folder or file to copy; by default the one the checkpoint's meta records
      ("tokenizer", the trainer's config.data.tokenizer). A sentencepiece model also gets a
      tokenizer.json.
    verify: read the written folder back and compare logits with the checkpoint before it is
      moved into place (train/export_verify.py; format hf); called with the report
      {"project": max |diff|[, "torch": max |diff| or why not]}. A failed check raises
      ExportError and writes nothing.
    merge_lora: the checkpoint is a LoRA run's (adapters only): export its base with the
      adapters merged into the kernels (LoraMergedParams), a plain Molmo (or Molmo2).
    A Molmo2 checkpoint (meta "model_family") exports to transformers' Molmo2 folder instead
    (molmo2_folder): config.json, its tokenizer, the run's processor_config.json, safetensors.
    A write that fails (disk full, read-only target) raises ExportError naming the file; no
    output folder appears and an existing one (force) is left as it was.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose from {FORMATS}")
    if remote_code and fmt != "hf":
        raise ExportError("--remote-code belongs to --format hf (the backbones load with transformers' own code)")
    if verify and fmt != "hf":
        raise ExportError("--verify checks --format hf folders (test_export_torch checks the backbone formats)")
    np_dtype = numpy_dtype(dtype)
    params = (LoraMergedParams if merge_lora else CheckpointParams)(checkpoint, step)
    try:
        tokenizer = tokenizer or params.meta.get("tokenizer")
        if not tokenizer:
            raise ExportError(f"{checkpoint}: the checkpoint does not record its tokenizer; pass --tokenizer with "
                              f"the tokenizer folder or file the model was trained with")
        config, local = params.config, bool(remote_code)
        if isinstance(config, Molmo2Config):
            folders = molmo2_folder(params, fmt, remote_code)
        elif fmt == "hf":  # folder -> (links, JSON files)
            folders = {"": (molmo_links(config), {
                "config.json": formats.molmo_config_json(config, dtype, local),
                "generation_config.json": {"_from_model_config": True},
                "preprocessor_config.json": formats.preprocessor_config_json(config, checkpoint_crop(params), local),
                "processor_config.json": formats.processor_config_json(config, local)})}
        else:
            folders = {"llm": (formats.causal_lm_links(config), None),
                       "vision": (formats.clip_vision_links(config),
                                  {"config.json": formats.clip_vision_config_json(config, dtype)})}
        with AtomicFolder(out, force) as tmp:
            for sub, (links, jsons) in folders.items():
                folder = os.path.join(tmp, sub)
                os.makedirs(folder, exist_ok=True)
                if sub in ("", "llm"):
                    tok = write_tokenizer(tokenizer, folder, config.llm.vocab_size)
                if sub == "llm":
                    jsons = {"config.json": formats.causal_lm_config_json(config, dtype, special_ids(tok, config))}
                for name, content in jsons.items():
                    write_json(os.path.join(folder, name), content)
                if remote_code:
                    copy_remote_code(remote_code, folder)
                write_safetensors(folder, params.read, links, params.abstract, np_dtype, max_shard_bytes,
                                  on_shard_done)
            if verify:
                verify(verify_export(params, tmp, np_dtype, with_torch=local))
    finally:
        params.close()
    return os.path.abspath(out)


# ----------------------------------------------------------------------------- import


def training_state(params: Dict, optimizer_config: Mapping, total_steps: int, seed: int) -> Dict:
    """The trainer's step-0 state with `params` (pure dict of float32 arrays) as the weights:
    params/frozen split by optimizer_config.frozen, a fresh optimizer state, step 0, the RNG
    key of `seed` (as train/trainer.init_train_state lays it out).

    Host numpy throughout, nothing copied: the params are the given arrays, and the optimizer
    state's parameter-shaped leaves (Adam moments) are np.zeros, which the OS maps lazily, so
    they cost no memory until written. Only its small leaves (counts, injected hyperparameters)
    are computed, by `tx.init` under jit, where XLA drops the large zeros it does not return."""
    patterns = [tuple(p) for p in optimizer_config["groups"]]
    tx = opt_lib.make_optimizer(optimizer_config, total_steps, patterns)
    trainable, frozen = opt_lib.split_trainable(params, optimizer_config["frozen"])
    _, rng_key = jax.random.split(jax.random.key(seed))
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(params)):  # under jax.eval_shape
        return {"params": trainable, "frozen": frozen, "opt_state": tx.init(trainable),
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng_key)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainable)

    def small_leaves_and_zero_checks():
        ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
        leaves = jax.tree.leaves(tx.init(ones))
        return [leaf if leaf.ndim == 0 else jnp.all(leaf == 0) for leaf in leaves]

    opt_abstract = jax.eval_shape(tx.init, abstract)
    leaves, treedef = jax.tree.flatten(opt_abstract)
    small = jax.jit(small_leaves_and_zero_checks)()
    opt_leaves = []
    for leaf, value in zip(leaves, small):
        if leaf.ndim == 0:
            opt_leaves.append(np.asarray(value))
        elif bool(value):
            opt_leaves.append(np.zeros(leaf.shape, leaf.dtype))
        else:  # would need the real init: an optimizer whose state does not start at zero
            raise ExportError(f"optimizer state leaf {leaf.shape} does not start at zero; import_hf cannot "
                              f"write it without computing it")
    return {"params": trainable, "frozen": frozen, "opt_state": jax.tree.unflatten(treedef, opt_leaves),
            "step": np.zeros((), np.int32), "rng": np.asarray(jax.random.key_data(rng_key))}


# OCDBT data files of the import's save. orbax's default (2 GiB) keeps up to that much encoded
# data in memory before a file is written: about a whole small model, twice the host memory.
IMPORT_DATA_FILE_BYTES = 32 * 2 ** 20


@contextlib.contextmanager
def streamed_orbax_save():
    """Within: a synchronous orbax save holds little beyond the arrays it writes. orbax normally
    deep-copies every numpy array first (so that an async save may outlive the caller's arrays),
    which doubles the host memory and materialises the lazily mapped zeros of the Adam moments;
    and it buffers up to IMPORT_DATA_FILE_BYTES of encoded data per file (a module default of
    orbax that Checkpointer's StandardSave cannot pass; left alone if orbax renames it)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils  # noqa: PLC0415 (private default)
    def register(handler) -> None:
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns of every override
        try:
            ocp.type_handlers.register_type_handler(np.ndarray, handler, override=True)
        finally:
            absl.setLevel(level)

    default_handler = ocp.type_handlers.get_type_handler(np.ndarray)
    default_size = getattr(tensorstore_utils, "_DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE", None)
    register(ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    if default_size is not None:
        tensorstore_utils._DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE = IMPORT_DATA_FILE_BYTES
    try:
        yield
    finally:
        register(default_handler)
        if default_size is not None:
            tensorstore_utils._DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE = default_size


def import_hf(hf_folder: str, out: str, train_config, *, force: bool = False) -> str:
    """An official HF Molmo folder -> a step-0 trainer checkpoint in `out` that
    `--config.init.checkpoint=out` fine-tunes from (or a run resumes from, with a fresh
    optimizer). train_config: the experiment ConfigDict to fine-tune with; its optimizer
    decides the params/frozen split and the optimizer state layout, its model must have the
    HF model's shapes; its family (config.model_family: a Molmo or a Molmo2 folder) and data
    layout (crop geometry; Molmo2's processor and row budget) are recorded for a later export.

    Streamed: tensors are read one at a time (hf_folder.HFTensors) into the float32 parameter
    arrays, which orbax writes as they are; peak host memory is about one float32 copy of the
    parameters plus the runtime (benchmarks/export.py --import)."""
    try:
        config = read_hf_config(hf_folder)
        family = families.family_of(train_config)
        wanted = family.config_cls.from_dict({**train_config.model.to_dict(), "dtype": "float32"})
        ours, theirs = dict(leaves(abstract_params(wanted))), dict(leaves(abstract_params(config)))
        for path in sorted(set(ours) | set(theirs)):
            a, b = ours.get(path), theirs.get(path)
            if a is None or b is None or a.shape != b.shape:
                raise ExportError(f"--config model does not fit {hf_folder}: parameter {'/'.join(path)} is "
                                  f"{None if a is None else a.shape} in the config, "
                                  f"{None if b is None else b.shape} in the checkpoint")
        params = hf_to_params(HFTensors(hf_folder), config)
    except CheckpointError as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"--hf {hf_folder}: {e}") from e
    state = training_state(params, train_config.optimizer, train_config.train.total_steps, train_config.seed)
    del params
    with AtomicFolder(out, force) as tmp, streamed_orbax_save():
        checkpointer = Checkpointer(tmp, keep=1, async_save=False)
        checkpointer.save(0, state, None, {"step": 0, "model": config.to_dict(), "mesh": {},
                                           "source": os.path.abspath(hf_folder), "model_family": family.name,
                                           **family.data_meta(train_config)})
        checkpointer.close()
    return os.path.abspath(out)
