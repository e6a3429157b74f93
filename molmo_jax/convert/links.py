"""The link mechanism every checkpoint converter uses: checkpoint tensors <-> our parameters.

    links = [linear_link("blocks.0.attn.weight", ("blocks", "attention", "q", "kernel"), 0, (D,), (N, H)), ...]
    params = tensors_to_params(state_dict, links, abstract)     # checkpoint -> pure nested dict
    tensors = params_to_tensors(params, links, abstract)        # pure nested dict -> checkpoint

A `Link` ties one or more checkpoint tensors (by key) to one or more of our parameter arrays (by
path in the nested parameter dict) with a function each way and the checkpoint shapes implied by
ours. `layer` is the index on the stacked leading "layers" axis of every path it names (None for
unstacked parameters). Fused tensors (q, k, v rows of one PyTorch weight) are one link with
several paths. A family's key map (molmo_keys, molmoe_keys, hf_backbones, ...) is a list of links.

Link functions run on numpy arrays (fast, exact) and on tracers (through jnp), so
`jax.eval_shape` checks a whole mapping on shapes without allocating anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = Tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint folder or tensor that does not fit (message names file / key / shapes)."""


@dataclasses.dataclass(frozen=True)
class Link:
    """Checkpoint tensors <-> our arrays. `layer` indexes the stacked axis of every path in `ours`."""

    hf: Tuple[str, ...]
    ours: Tuple[Path, ...]
    layer: Optional[int]
    to_ours: Callable[..., Sequence[jax.Array]]
    to_hf: Callable[..., Sequence[jax.Array]]
    hf_shapes: Callable[..., Sequence[Tuple[int, ...]]]  # our per-layer shapes -> checkpoint shapes


def array_module(*arrays):
    """numpy for concrete arrays, jnp under tracing (jax.eval_shape / jit)."""
    return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


# ----------------------------------------------------------------------------- link constructors


def fused_linear_link(hf: str, ours: Sequence[Path], layer, in_shape, out_shapes) -> Link:
    """PyTorch weight [sum(prod(out_i)), prod(in)] (rows = the parts in order) <->
    kernels [*in_shape, *out_i]."""
    sizes = [math.prod(s) for s in out_shapes]
    n_in = math.prod(in_shape)

    def to_ours(w):
        parts = array_module(w).split(w, np.cumsum(sizes)[:-1].tolist(), axis=0)
        return [p.T.reshape(*in_shape, *s) for p, s in zip(parts, out_shapes)]

    def to_hf(*kernels):
        return [array_module(*kernels).concatenate([k.reshape(n_in, -1).T for k in kernels], axis=0)]

    def hf_shapes(*shapes):
        return [(sum(math.prod(s[len(in_shape):]) for s in shapes), n_in)]

    return Link((hf,), tuple(ours), layer, to_ours, to_hf, hf_shapes)


def fused_vector_link(hf: str, ours: Sequence[Path], layer, out_shapes) -> Link:
    """A 1-D tensor of concatenated parts (fused biases) <-> arrays of out_shapes."""
    sizes = [math.prod(s) for s in out_shapes]

    def to_ours(b):
        parts = array_module(b).split(b, np.cumsum(sizes)[:-1].tolist(), axis=0)
        return [p.reshape(s) for p, s in zip(parts, out_shapes)]

    def to_hf(*arrays):
        return [array_module(*arrays).concatenate([a.reshape(-1) for a in arrays], axis=0)]

    return Link((hf,), tuple(ours), layer, to_ours, to_hf, lambda *shapes: [(sum(map(math.prod, shapes)),)])


def linear_link(hf: str, ours: Path, layer, in_shape, out_shape) -> Link:
    return fused_linear_link(hf, [ours], layer, in_shape, [out_shape])


def same_link(hf: str, ours: Path, layer=None) -> Link:
    return Link((hf,), (ours,), layer, lambda a: [a], lambda a: [a], lambda s: [tuple(s)])


def vector_link(hf: str, ours: Path, layer, shape) -> Link:
    return fused_vector_link(hf, [ours], layer, [shape])


def constant_link(key: str, value: np.ndarray) -> Link:
    """A tensor the target format needs but Molmo does not have (e.g. CLIP's post_layernorm)."""
    return Link((key,), (), None, lambda: [], lambda: [value], lambda: [value.shape])


def mha_links(hf: str, ours: Path, layer, d_in, heads, head_dim, d_out) -> List[Link]:
    """ViT / pooling attention: wq, wk, wv [H*N, d_in] + bias, wo [d_out, N*H] + bias."""
    out = []
    for name in ("wq", "wk", "wv"):
        out.append(linear_link(f"{hf}.{name}.weight", ours + (name, "kernel"), layer, (d_in,), (heads, head_dim)))
        out.append(vector_link(f"{hf}.{name}.bias", ours + (name, "bias"), layer, (heads, head_dim)))
    out.append(linear_link(f"{hf}.wo.weight", ours + ("wo", "kernel"), layer, (heads, head_dim), (d_out,)))
    out.append(same_link(f"{hf}.wo.bias", ours + ("wo", "bias"), layer))
    return out


def norm_links(hf: str, ours: Path, layer, with_bias: bool) -> List[Link]:
    links = [same_link(f"{hf}.weight", ours + ("scale",), layer)]
    if with_bias:
        links.append(same_link(f"{hf}.bias", ours + ("bias",), layer))
    return links


def prefixed_links(links: Sequence[Link], hf_prefix: str, ours_prefix: Path) -> List[Link]:
    """The same links with `hf_prefix` before every key and `ours_prefix` before every path."""
    return [dataclasses.replace(link, hf=tuple(hf_prefix + k for k in link.hf),
                                ours=tuple(ours_prefix + p for p in link.ours)) for link in links]


# ----------------------------------------------------------------------------- nested dicts


def get_path(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: Dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def has_path(tree, path: Path) -> bool:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return False
        tree = tree[p]
    return True


def leaves(tree: Mapping, prefix: Path = ()) -> Iterator[Tuple[Path, object]]:
    """(path, leaf) of a nested dict, depth first in insertion order."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def pure_params(params) -> Dict:
    """An nnx.Module, an nnx.State or a pure dict -> pure nested dict of parameter arrays."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return params


def abstract_state(module_fn: Callable[[], nnx.Module]) -> Dict:
    """Pure nested dict of jax.ShapeDtypeStruct of the parameters `module_fn` builds (nothing allocated)."""
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn), nnx.Param))


# ----------------------------------------------------------------------------- applying links


def link_shapes(link: Link, abstract: Mapping) -> List[Tuple[int, ...]]:
    """Our per-layer shapes of the paths `link` names (the stacked axis dropped for a layer link)."""
    shapes = [tuple(get_path(abstract, p).shape) for p in link.ours]
    return shapes if link.layer is None else [s[1:] for s in shapes]


def tensors_to_params(state_dict: Mapping[str, object], links: Sequence[Link], abstract: Mapping, *,
                      dropped: Callable[[str], bool] = lambda key: False) -> Dict:
    """Tensors named by `links` -> pure nested dict shaped like `abstract` (float32; numpy
    for numpy input). Keys for which `dropped(key)` holds are deliberately unused; any other
    missing, unexpected or wrongly shaped tensor raises CheckpointError naming it.

    Each tensor is looked up once and, for numpy input, written straight into its float32
    target array (per-layer tensors into their slice of the stacked array), so a lazy
    `state_dict` (convert/hf_folder.HFTensors) is streamed: host memory holds the targets and
    one tensor, not the checkpoint as well."""
    wanted = [k for link in links for k in link.hf]
    missing = [k for k in wanted if k not in state_dict]
    unexpected = sorted(k for k in set(state_dict) - set(wanted) if not dropped(k))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint keys do not fit the config: missing {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)")
    per_layer: Dict[Path, Dict[int, jax.Array]] = {}  # traced input only: stacked at the end
    filled: Dict[Path, int] = {}  # numpy input: layers written into each stacked target
    out: Dict = {}
    for link in links:
        arrays = []
        for key, expected in zip(link.hf, link.hf_shapes(*link_shapes(link, abstract))):
            value = state_dict[key]
            if tuple(value.shape) != tuple(expected):
                raise CheckpointError(f"{key}: checkpoint shape {tuple(value.shape)} does not match the shape "
                                      f"{tuple(expected)} the config requires")
            arrays.append(array_module(value).asarray(value, dtype=np.float32))
        traced = array_module(*arrays) is jnp
        for path, value in zip(link.ours, link.to_ours(*arrays)):
            if link.layer is None:
                set_path(out, path, value if traced else np.ascontiguousarray(value))
            elif traced:
                per_layer.setdefault(path, {})[link.layer] = value
            else:
                if not has_path(out, path):
                    set_path(out, path, np.empty(get_path(abstract, path).shape, np.float32))
                get_path(out, path)[link.layer] = value
                filled[path] = filled.get(path, 0) + 1
        del arrays
    for path, layers in per_layer.items():
        set_path(out, path, jnp.stack([layers[i] for i in range(len(layers))]))
    for path, count in filled.items():  # every layer of a stacked parameter written, none left uninitialised
        if count != get_path(abstract, path).shape[0]:
            raise CheckpointError(f"parameter {'/'.join(path)}: the links fill {count} of its "
                                  f"{get_path(abstract, path).shape[0]} layers")
    return out


def params_to_tensors(params: Mapping, links: Sequence[Link], abstract: Mapping) -> Dict[str, jax.Array]:
    """Inverse of tensors_to_params: pure nested dict -> tensors named by `links`."""
    out: Dict[str, jax.Array] = {}
    for link in links:
        arrays = []
        for path, shape in zip(link.ours, link_shapes(link, abstract)):
            value = get_path(params, path)
            value = value if link.layer is None else value[link.layer]
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"parameter {'/'.join(path)}: shape {tuple(value.shape)} does not match "
                                      f"the config's {tuple(shape)}")
            arrays.append(value)
        out.update(zip(link.hf, link.to_hf(*arrays)))
    return out
