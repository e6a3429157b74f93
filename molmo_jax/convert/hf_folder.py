"""Hugging Face checkpoint folders on disk: config.json and safetensors, whole or sharded.

    is_hf_folder(folder)                         # config.json + model.safetensors or an index
    config = read_config_json(folder)            # the config.json dict
    tensors = read_hf_tensors(folder)            # every tensor, numpy, PyTorch layout
    lazy = HFTensors(folder)                     # the same mapping, one tensor read per lookup
    write_hf_folder(folder, tensors, config)     # model.safetensors, or shards + index

What the tensors and the config mean is the business of a family's key map (molmo_keys,
molmoe_keys, hf_backbones); this module only reads and writes files. Unreadable files raise
CheckpointError naming the file (and the tensor, where one is at fault).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Mapping, Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from molmo_jax.convert.links import CheckpointError

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_hf_folder(folder: str) -> bool:
    """config.json plus model.safetensors or a sharded index."""
    return os.path.exists(os.path.join(folder, "config.json")) and any(
        os.path.exists(os.path.join(folder, name)) for name in (SAFETENSORS, INDEX))


def read_config_json(folder: str) -> Dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


class HFTensors(Mapping):
    """The tensors of model.safetensors or of the shards model.safetensors.index.json names, as a
    read-only mapping key -> numpy array that reads a tensor from disk each time it is looked up
    (safe_open per lookup, so no shard stays mapped: host memory holds the tensor asked for, not
    the files). `shape(key)` reads the header only."""

    def __init__(self, folder: str):
        index_path, single = os.path.join(folder, INDEX), os.path.join(folder, SAFETENSORS)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from e
        elif os.path.exists(single):
            weight_map = None
        else:
            raise CheckpointError(f"{folder}: neither {SAFETENSORS} nor {INDEX} found")
        files = [SAFETENSORS] if weight_map is None else sorted(set(weight_map.values()))
        self.file_of: Dict[str, str] = {}
        self.shapes: Dict[str, tuple] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: names shard {name}, which does not exist")
            with self._open(path) as handle:
                for key in handle.keys():
                    self.file_of[key] = path
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.file_of))
            if absent:
                raise CheckpointError(f"{index_path}: keys listed but absent from their shards: {absent[:10]}")

    @staticmethod
    def _open(path: str):
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    def shape(self, key: str) -> tuple:
        return self.shapes[key]

    def __getitem__(self, key: str) -> np.ndarray:
        path = self.file_of[key]
        with self._open(path) as handle:
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: tensor {key} cannot be read, the file is truncated or corrupt "
                                      f"({e})") from e

    def __contains__(self, key) -> bool:  # without reading the tensor
        return key in self.file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def read_hf_tensors(folder: str) -> Dict[str, np.ndarray]:
    """All tensors of an HF folder in memory; `HFTensors(folder)` reads them one at a time."""
    return dict(HFTensors(folder))


def write_hf_folder(folder: str, tensors: Mapping[str, np.ndarray], config_json: Mapping, *,
                    max_shard_bytes: Optional[int] = None) -> None:
    """Writes config.json and model.safetensors (or shards + index above max_shard_bytes), in memory:
    for large models use the streamed writer of convert/safetensors_stream.py."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json, f, indent=1)
    meta = {"format": "pt"}
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(folder, SAFETENSORS), metadata=meta)
        return
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
