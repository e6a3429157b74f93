"""Safetensors shards written tensor by tensor, in an order planned from shapes alone.

    plan = plan_tensors(group_links(links), abstract)          # (key, shape) of every tensor
    writer = ShardedSafetensorsWriter(folder, plan, np.float32, max_shard_bytes)
    stream_tensors(read, links, writer)                        # read(paths) -> {path: array}
    writer.write_index()                                       # model.safetensors.index.json

Links (convert/links.Link) that share a parameter form a group; a group's parameters are
read together once and every tensor they feed is converted and appended to its shard. Shard
boundaries and safetensors headers are known up front, so nothing but the current group and
tensor is held in memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from molmo_jax.convert.hf_folder import INDEX
from molmo_jax.convert.links import Link, Path, link_shapes

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
ReadFn = Callable[[Sequence[Path]], Dict[Path, np.ndarray]]


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


def plan_tensors(groups: Sequence[Group], abstract: Mapping) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of every output tensor, in the order the groups produce them."""
    return [(key, tuple(shape)) for g in groups for link in g.links
            for key, shape in zip(link.hf, link.hf_shapes(*link_shapes(link, abstract)))]


# ----------------------------------------------------------------------------- writing


class ShardedSafetensorsWriter:
    """Writes tensors, in a planned order, into safetensors shards + model.safetensors.index.json.

    Shard boundaries and every header are fixed up front from the plan, so each tensor is
    appended as it arrives and nothing else is held in memory.
    """

    def __init__(self, folder: str, plan: Sequence[Tuple[str, Tuple[int, ...]]], dtype, max_shard_bytes: int,
                 on_shard_done: Callable[[str], None] = lambda name: None):
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.code, self.itemsize = SAFETENSORS_DTYPES[self.dtype.name], self.dtype.itemsize
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
        np.ascontiguousarray(array, dtype=self.dtype).tofile(self._file)  # no bytes copy
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
        write_json(os.path.join(self.folder, INDEX), index)


def stream_tensors(read: ReadFn, links: Sequence[Link], writer: ShardedSafetensorsWriter) -> None:
    """Reads each group of parameters once (in plan order) and writes every tensor it feeds."""
    for group in group_links(links):
        arrays = read(group.paths) if group.paths else {}
        for link in group.links:
            outputs = link.to_hf(*[arrays[p] if link.layer is None else arrays[p][link.layer] for p in link.ours])
            for key, value in zip(link.hf, outputs):
                writer.write(key, np.asarray(value))
            del outputs, value  # before the next read: the peak is one group and its tensors
        del arrays


def write_safetensors(folder: str, read: ReadFn, links: Sequence[Link], abstract: Mapping, dtype,
                      max_shard_bytes: int, on_shard_done: Callable[[str], None] = lambda name: None) -> None:
    """Every tensor of `links` into shards of at most max_shard_bytes (a single larger tensor
    gets a shard of its own) + the index. dtype: np.float32 or ml_dtypes.bfloat16."""
    writer = ShardedSafetensorsWriter(folder, plan_tensors(group_links(links), abstract), dtype, max_shard_bytes,
                                      on_shard_done)
    stream_tensors(read, links, writer)
    writer.write_index()


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
