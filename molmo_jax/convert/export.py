"""Trainer checkpoints -> Hugging Face / PyTorch folders, streamed; HF folders -> trainer checkpoints.

    export_checkpoint("run/checkpoints", "out/", tokenizer="tok/")            # official Molmo layout
    export_checkpoint("run/checkpoints", "out/", fmt="torch-backbones")       # out/llm, out/vision
    import_hf("Molmo-7B-D-0924/", "ckpt/", train_config)                      # step-0 training state

Streaming: the tensors to write are planned from shapes alone (key, shape, shard, byte offset),
so every safetensors header is written before any data. The parameters are then read from the
orbax checkpoint one group at a time (the arrays that feed one fused tensor, e.g. q, k and v of
all layers; orbax partial restore into numpy, which also reassembles a checkpoint saved on any
mesh), converted, cast and appended to their shard. Peak host memory is the largest group plus
one tensor, not the model; the optimizer state is never read.

Everything is written into a hidden temporary folder next to the target and renamed at the end,
so an interrupted export leaves no output folder; a non-empty target needs `force`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from molmo_jax.convert.hf_molmo import (PREFIX, CheckpointError, Link, Path, abstract_params, config_to_hf,
                                        molmo_links, read_hf_config, read_hf_tensors, hf_to_params)
from molmo_jax.convert import hf_backbones
from molmo_jax.model.config import MolmoConfig

log = logging.getLogger(__name__)

FORMATS = ("hf", "torch-backbones")
DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None)}  # bf16 numpy type from ml_dtypes
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer.model", "spm.model", "chat_template.jinja")
# transformers loads the official remote code from these repositories (auto_map "repo--module.Class").
OFFICIAL_CODE = {"dense": "allenai/Molmo-7B-D-0924", "olmo": "allenai/Molmo-7B-O-0924", "moe": "allenai/MolmoE-1B-0924"}


class ExportError(ValueError):
    """Bad export/import input: the message names the folder, file, step or flag."""


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
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose from {sorted(DTYPES)}")
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return ml_dtypes.bfloat16
    return np.float32


# ----------------------------------------------------------------------------- reading a checkpoint


class CheckpointParams:
    """Parameters of one train/checkpointing.Checkpointer step, read a few arrays at a time.

    The trainer stores params in state["params"] (trainable) and state["frozen"]; each of our
    parameter paths is found in one of them. `config` comes from the checkpoint's meta item.
    """

    def __init__(self, directory: str, step: Optional[int] = None):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self._ocp = ocp
        if not os.path.isdir(directory):
            raise ExportError(f"--checkpoint {directory}: not a folder")
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
        self.config = MolmoConfig.from_dict(self.meta["model"])
        tree = self.manager.item_metadata(self.step)["state"].tree
        self.abstract = abstract_params(self.config)
        self.location: Dict[Path, Tuple[str, ...]] = {}
        for path, leaf in _leaves(self.abstract):
            where = [k for k in ("params", "frozen") if _has(tree.get(k, {}), path)]
            if not where:
                raise ExportError(f"{directory}/{self.step}/state: parameter {'/'.join(path)} is in neither "
                                  f"'params' nor 'frozen'")
            stored = _get(tree[where[0]], path)
            if tuple(stored.shape) != tuple(leaf.shape):
                raise ExportError(f"{directory}/{self.step}/state: {where[0]}/{'/'.join(path)} has shape "
                                  f"{tuple(stored.shape)}, the recorded model config needs {tuple(leaf.shape)}")
            self.location[path] = (where[0],) + path

    def read(self, paths: Sequence[Path]) -> Dict[Path, np.ndarray]:
        """float32 numpy arrays of `paths`, whatever mesh the checkpoint was saved on."""
        ocp = self._ocp
        item, restore_args = {}, {}
        for path in paths:
            _set(item, self.location[path], 0)
            _set(restore_args, self.location[path], ocp.RestoreArgs(restore_type=np.ndarray))
        state = self.manager.restore(self.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))["state"]
        return {path: np.asarray(_get(state, self.location[path]), np.float32) for path in paths}

    def close(self) -> None:
        self.manager.close()


def _leaves(tree: Mapping, prefix: Path = ()) -> Iterator[Tuple[Path, object]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _has(tree, path: Path) -> bool:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return False
        tree = tree[p]
    return True


def _get(tree, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Group:
    """Links that share parameters: their arrays are read together, once."""

    paths: List[Path]
    links: List[Link]


def group_links(links: Sequence[Link]) -> List[Group]:
    """Connected components of links over shared parameter paths, in first-appearance order."""
    owner: Dict[Path, int] = {}
    groups: List[Optional[Group]] = []
    for link in links:
        hits = sorted({owner[p] for p in link.ours if p in owner})
        if not hits:
            groups.append(Group([], []))
            hits = [len(groups) - 1]
        target = groups[hits[0]]
        for i in hits[1:]:  # a link joining two groups merges them
            target.paths += groups[i].paths
            target.links += groups[i].links
            for p in groups[i].paths:
                owner[p] = hits[0]
            groups[i] = None
        target.links.append(link)
        for p in link.ours:
            if p not in owner:
                owner[p] = hits[0]
                target.paths.append(p)
    return [g for g in groups if g is not None]


def _layer_shapes(link: Link, abstract: Mapping) -> List[Tuple[int, ...]]:
    shapes = [tuple(_get(abstract, p).shape) for p in link.ours]
    return shapes if link.layer is None else [s[1:] for s in shapes]


def plan_tensors(groups: Sequence[Group], abstract: Mapping) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every output tensor, in the order the groups produce them."""
    return [(key, tuple(shape)) for g in groups for link in g.links
            for key, shape in zip(link.hf, link.hf_shapes(*_layer_shapes(link, abstract)))]


def constant_link(key: str, value: np.ndarray) -> Link:
    """A tensor the target format needs but Molmo does not have (e.g. CLIP's post_layernorm)."""
    return Link((key,), (), None, lambda: [], lambda: [value], lambda: [value.shape])


# ----------------------------------------------------------------------------- writing


class ShardedSafetensorsWriter:
    """Writes tensors, in a planned order, into safetensors shards + model.safetensors.index.json.

    Shard boundaries and every header are fixed up front from the plan, so each tensor is
    appended as it arrives and nothing else is held in memory.
    """

    def __init__(self, folder: str, plan: Sequence[Tuple[str, Tuple[int, ...]]], dtype: str, max_shard_bytes: int,
                 on_shard_done: Callable[[str], None] = lambda name: None):
        self.folder, self.dtype, self.code = folder, numpy_dtype(dtype), DTYPES[dtype][0]
        self.itemsize = np.dtype(self.dtype).itemsize
        shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
        size = 0
        for key, shape in plan:
            nbytes = math.prod(shape) * self.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, shape))
            size += nbytes
        self.shards = [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]
        self.order = iter([(name, key, shape) for name, s in self.shards for key, shape in s])
        self.total_size = sum(math.prod(shape) * self.itemsize for _, shape in plan)
        self.total_parameters = sum(math.prod(shape) for _, shape in plan)
        self.on_shard_done = on_shard_done
        self._file = None
        self._name = None
        self._pending = {name: len(s) for name, s in self.shards}

    def _open(self, name: str) -> None:
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in dict(self.shards)[name]:
            end = offset + math.prod(shape) * self.itemsize
            header[key] = {"dtype": self.code, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(os.path.join(self.folder, name), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._name = name

    def write(self, key: str, array: np.ndarray) -> None:
        name, expected_key, shape = next(self.order)
        if key != expected_key or tuple(array.shape) != shape:
            raise RuntimeError(f"tensor {key} {tuple(array.shape)} arrived out of plan (expected {expected_key} "
                               f"{shape})")
        if name != self._name:
            self._open(name)
        self._file.write(np.ascontiguousarray(array.astype(self.dtype, copy=False)).tobytes())
        self._pending[name] -= 1
        if self._pending[name] == 0:
            self._file.close()
            self._file, self._name = None, None
            self.on_shard_done(name)

    def write_index(self) -> None:
        unwritten = [n for n, c in self._pending.items() if c]
        if unwritten:
            raise RuntimeError(f"shards {unwritten} are incomplete")
        weight_map = {key: name for name, s in self.shards for key, _ in s}
        index = {"metadata": {"total_size": self.total_size, "total_parameters": self.total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(self.folder, INDEX), index)


def stream_tensors(params: CheckpointParams, links: Sequence[Link], writer: ShardedSafetensorsWriter) -> None:
    """Reads each group of parameters once and writes every tensor it feeds."""
    groups = group_links(links)
    for group in groups:
        arrays = params.read(group.paths) if group.paths else {}
        for link in group.links:
            inputs = [arrays[p] if link.layer is None else arrays[p][link.layer] for p in link.ours]
            for key, value in zip(link.hf, link.to_hf(*inputs)):
                writer.write(key, np.asarray(value))
        del arrays


def write_safetensors(folder: str, params: CheckpointParams, links: Sequence[Link], dtype: str,
                      max_shard_bytes: int, on_shard_done=lambda name: None) -> None:
    plan = plan_tensors(group_links(links), params.abstract)
    writer = ShardedSafetensorsWriter(folder, plan, dtype, max_shard_bytes, on_shard_done)
    stream_tensors(params, links, writer)
    writer.write_index()


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- formats


def _prefixed(links: Sequence[Link], hf_prefix: str, ours_prefix: Path) -> List[Link]:
    return [dataclasses.replace(link, hf=tuple(hf_prefix + k for k in link.hf),
                                ours=tuple(ours_prefix + p for p in link.ours)) for link in links]


def molmo_config_json(config: MolmoConfig, dtype: str) -> Dict:
    """The official config.json, with auto_map pointing at the official remote code on the hub."""
    out = config_to_hf(config)
    c = config.llm
    repo = OFFICIAL_CODE["moe" if c.block_type == "moe" else "olmo" if c.norm_after else "dense"]
    out["auto_map"] = {k: f"{repo}--{v}" for k, v in out.get("auto_map", {}).items()}
    out["torch_dtype"] = dtype
    return out


def preprocessor_config_json(config: MolmoConfig) -> Dict:
    """The official preprocessor_config.json (release crop settings: 12 crops, margins 4/4)."""
    vc, cc = config.vision, config.connector
    repo = OFFICIAL_CODE["moe" if config.llm.block_type == "moe" else "olmo" if config.llm.norm_after else "dense"]
    return {
        "auto_map": {"AutoImageProcessor": f"{repo}--image_preprocessing_molmo.MolmoImageProcessor",
                     "AutoProcessor": f"{repo}--preprocessing_molmo.MolmoProcessor"},
        "base_image_input_size": list(vc.image_size), "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_padding_mask": True, "image_patch_size": vc.patch_size,
        "image_processor_type": "MolmoImageProcessor",
        "image_token_length_h": -(-vc.grid[0] // cc.pool_h), "image_token_length_w": -(-vc.grid[1] // cc.pool_w),
        "max_crops": 12, "overlap_margins": [4, 4], "processor_class": "MolmoProcessor",
    }


def clip_vision_config_json(config: MolmoConfig, dtype: str) -> Dict:
    vc = config.vision
    if not (vc.use_cls_token and vc.pre_ln and not vc.patch_bias and vc.image_size[0] == vc.image_size[1]
            and vc.num_heads * vc.head_dim == vc.width):
        raise ExportError(f"--format torch-backbones: the ViT ({vc.kind}) is not a CLIP vision tower (needs a CLS "
                          f"token, pre-LN, no patch bias, square images, heads * head_dim = width)")
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[vc.activation]
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": vc.width,
            "intermediate_size": vc.mlp_dim, "num_attention_heads": vc.num_heads, "num_hidden_layers": vc.num_layers,
            "image_size": vc.image_size[0], "patch_size": vc.patch_size, "num_channels": 3, "hidden_act": act,
            "layer_norm_eps": vc.norm_eps, "attention_dropout": 0.0, "projection_dim": vc.width,
            "torch_dtype": dtype}


def clip_vision_links(config: MolmoConfig) -> List[Link]:
    """CLIPVisionModel keys; Molmo drops CLIP's post_layernorm, exported as the identity
    (hidden_states are unaffected, last_hidden_state/pooler_output see an untrained LN)."""
    w = config.vision.width
    links = _prefixed(hf_backbones.vision_links_hf(config.vision), "vision_model.", ("vision",))
    return links + [constant_link("vision_model.post_layernorm.weight", np.ones((w,), np.float32)),
                    constant_link("vision_model.post_layernorm.bias", np.zeros((w,), np.float32))]


def causal_lm_config_json(config: MolmoConfig, dtype: str) -> Dict:
    """Qwen2 (pre-norm dense), OLMo2 (post-norm, QK-norm) or OLMoE (MoE) config.json."""
    c = config.llm
    common = {"vocab_size": c.embedding_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
              "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "tie_word_embeddings": False, "attention_dropout": 0.0,
              "torch_dtype": dtype}
    if c.block_type == "moe":
        if c.norm_after or not c.qk_norm or c.qkv_bias:
            raise ExportError("--format torch-backbones: an MoE LLM exports as OLMoE, which is pre-norm with "
                              "QK-norm and no q/k/v bias")
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **common,
                "intermediate_size": c.moe_hidden_size, "num_experts": c.moe_num_experts,
                "num_experts_per_tok": c.moe_top_k, "norm_topk_prob": c.moe_renormalize, "clip_qkv": None,
                "attention_bias": False, "router_aux_loss_coef": c.moe_load_balance_weight}
    if c.norm_after:
        if c.qkv_bias:
            raise ExportError("--format torch-backbones: a post-norm LLM exports as OLMo2, which has no q/k/v bias")
        return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **common,
                "intermediate_size": c.mlp_hidden_size // 2, "attention_bias": False}
    if c.qk_norm:
        raise ExportError("--format torch-backbones: a pre-norm dense LLM with full-width QK-norm has no "
                          "transformers counterpart (Qwen2 has no QK-norm, OLMo2 is post-norm)")
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
            "intermediate_size": c.mlp_hidden_size // 2, "use_sliding_window": False}


def causal_lm_links(config: MolmoConfig) -> List[Link]:
    """Our LLM as a transformers CausalLM. The 128 `new_embedding` rows (image/special tokens)
    have no place in a text-only model and are left out; tensors the architecture always has
    but this model lacks are written as their identity values (zero biases, unit QK-norms)."""
    c = config.llm
    links = _prefixed(hf_backbones.llm_links_hf(c, "per_expert"), "", ("llm",))
    for i in range(c.n_layers):
        p = f"model.layers.{i}.self_attn"
        if not c.qkv_bias and not c.norm_after and c.block_type == "dense":  # Qwen2 always has q/k/v biases
            links += [constant_link(f"{p}.{n}_proj.bias", np.zeros((heads * c.head_dim,), np.float32))
                      for n, heads in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads))]
        if c.norm_after and not c.qk_norm:  # OLMo2 always normalises q and k
            links += [constant_link(f"{p}.q_norm.weight", np.ones((c.n_heads * c.head_dim,), np.float32)),
                      constant_link(f"{p}.k_norm.weight", np.ones((c.n_kv_heads * c.head_dim,), np.float32))]
    return links


# ----------------------------------------------------------------------------- folders


def _stale_temporaries(out: str) -> List[str]:
    parent, name = os.path.split(out)
    prefix = f".{name}.partial-"
    stale = []
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            pid = entry[len(prefix):]
            alive = pid.isdigit() and _pid_alive(int(pid))
            if not alive:
                stale.append(os.path.join(parent, entry))
    return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicFolder:
    """`with AtomicFolder(out, force) as tmp:` writes into `.NAME.partial-PID` beside `out` and
    renames it to `out` on success; on any error (or SIGTERM turned into SystemExit) the
    temporary folder is removed. Leftovers of killed runs are removed at the next start."""

    def __init__(self, out: str, force: bool):
        self.out = os.path.abspath(out.rstrip("/") or out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ExportError(f"--out {out}: exists and is not a folder")
        if os.path.isdir(self.out) and os.listdir(self.out) and not force:
            raise ExportError(f"--out {out}: folder exists and is not empty; pass --force to replace it")
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise ExportError(f"--out {out}: parent folder {parent} does not exist")
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}.partial-{os.getpid()}")

    def __enter__(self) -> str:
        for stale in _stale_temporaries(self.out):
            log.warning("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.out):
            shutil.rmtree(self.out)
        os.rename(self.tmp, self.out)


def copy_tokenizer(source: str, folder: str) -> List[str]:
    """Copies the tokenizer files of `source` (a folder, or one tokenizer.json / sentencepiece
    .model file) into `folder`; returns the names copied."""
    if os.path.isfile(source):
        names = [source]
    elif os.path.isdir(source):
        names = [os.path.join(source, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    else:
        raise ExportError(f"--tokenizer {source}: no such file or folder")
    if not names:
        raise ExportError(f"--tokenizer {source}: none of {list(TOKENIZER_FILES)} in it")
    for path in names:
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    return [os.path.basename(p) for p in names]


def export_checkpoint(checkpoint: str, out: str, *, step: Optional[int] = None, fmt: str = "hf",
                      dtype: str = "float32", max_shard_bytes: int = 5 * 10 ** 9, tokenizer: Optional[str] = None,
                      force: bool = False, on_shard_done: Callable[[str], None] = lambda name: None) -> str:
    """Exports one trainer checkpoint (the latest unless `step`) to `out`; returns `out`.

    fmt "hf": the official Molmo folder (config.json, generation_config.json,
      preprocessor_config.json, tokenizer files, safetensors shards + index).
    fmt "torch-backbones": out/llm (Qwen2 / OLMo2 / OLMoE CausalLM, tokenizer files) and
      out/vision (CLIPVisionModel), each loadable with transformers' from_pretrained.
    tokenizer: folder or file to copy; by default the one the checkpoint's meta records
      ("tokenizer"), which the trainer does not record at present.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose from {FORMATS}")
    numpy_dtype(dtype)
    params = CheckpointParams(checkpoint, step)
    try:
        tokenizer = tokenizer or params.meta.get("tokenizer")
        if not tokenizer:
            raise ExportError(f"{checkpoint}: the checkpoint does not record its tokenizer; pass --tokenizer with "
                              f"the tokenizer folder or file the model was trained with")
        with AtomicFolder(out, force) as tmp:
            config = params.config
            if fmt == "hf":
                _write_json(os.path.join(tmp, "config.json"), molmo_config_json(config, dtype))
                _write_json(os.path.join(tmp, "generation_config.json"), {"_from_model_config": True})
                _write_json(os.path.join(tmp, "preprocessor_config.json"), preprocessor_config_json(config))
                copy_tokenizer(tokenizer, tmp)
                write_safetensors(tmp, params, molmo_links(config), dtype, max_shard_bytes, on_shard_done)
            else:
                llm, vision = os.path.join(tmp, "llm"), os.path.join(tmp, "vision")
                os.makedirs(llm)
                os.makedirs(vision)
                _write_json(os.path.join(llm, "config.json"), causal_lm_config_json(config, dtype))
                _write_json(os.path.join(vision, "config.json"), clip_vision_config_json(config, dtype))
                copy_tokenizer(tokenizer, llm)
                write_safetensors(llm, params, causal_lm_links(config), dtype, max_shard_bytes, on_shard_done)
                write_safetensors(vision, params, clip_vision_links(config), dtype, max_shard_bytes, on_shard_done)
    finally:
        params.close()
    return os.path.abspath(out)


# ----------------------------------------------------------------------------- import


def training_state(config: MolmoConfig, params: Dict, optimizer_config: Mapping, total_steps: int, seed: int) -> Dict:
    """The trainer's step-0 state with `params` (pure dict of float32 arrays) as the weights:
    params/frozen split by optimizer_config.frozen, a fresh optimizer state, step 0, the RNG
    key of `seed` (as train/trainer.init_train_state lays it out)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from molmo_jax.train import optimizer as opt_lib  # noqa: PLC0415

    patterns = [tuple(p) for p in optimizer_config["groups"]]
    tx = opt_lib.make_optimizer(optimizer_config, total_steps, patterns)
    trainable, frozen = opt_lib.split_trainable(jax.device_put(params), optimizer_config["frozen"])
    _, rng_key = jax.random.split(jax.random.key(seed))
    return {"params": trainable, "frozen": frozen, "opt_state": jax.jit(tx.init)(trainable),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng_key)}


def import_hf(hf_folder: str, out: str, train_config, *, force: bool = False) -> str:
    """An official HF Molmo folder -> a step-0 trainer checkpoint in `out` that
    `--config.init.checkpoint=out` fine-tunes from (or a run resumes from, with a fresh
    optimizer). train_config: the experiment ConfigDict to fine-tune with; its optimizer
    decides the params/frozen split and the optimizer state layout, its model must have the
    HF model's shapes."""
    from molmo_jax.train.checkpointing import Checkpointer  # noqa: PLC0415

    try:
        config = read_hf_config(hf_folder)
        params = hf_to_params(read_hf_tensors(hf_folder), config)
    except CheckpointError as e:
        raise ExportError(f"--hf {hf_folder}: {e}") from e
    wanted = MolmoConfig.from_dict({**train_config.model.to_dict(), "dtype": "float32"})
    ours, theirs = dict(_leaves(abstract_params(wanted))), dict(_leaves(abstract_params(config)))
    for path in sorted(set(ours) | set(theirs)):
        a, b = ours.get(path), theirs.get(path)
        if a is None or b is None or a.shape != b.shape:
            raise ExportError(f"--config model does not fit {hf_folder}: parameter {'/'.join(path)} is "
                              f"{None if a is None else a.shape} in the config, "
                              f"{None if b is None else b.shape} in the checkpoint")
    state = training_state(config, params, train_config.optimizer, train_config.train.total_steps, train_config.seed)
    with AtomicFolder(out, force) as tmp:
        checkpointer = Checkpointer(tmp, keep=1, async_save=False)
        checkpointer.save(0, state, None, {"step": 0, "model": config.to_dict(), "mesh": {},
                                           "source": os.path.abspath(hf_folder)})
        checkpointer.close()
    return os.path.abspath(out)
