"""Mixture-of-experts checkpoint layouts: the router and experts of one block, in each layout we read.

Used by the OLMoE backbone map (hf_backbones.py) and the MolmoE-1B layout (molmoe_keys.py).

Our MoE parameters (`molmo_jax.model.moe.MoEFeedForward`, stacked on "layers" in the LLM):
  router [D, E], gate [E, D, F], up [E, D, F], down [E, F, D]

Expert layouts understood by `moe_links` (PyTorch `nn.Linear.weight` is [out, in]):
  "per_expert"  HF hub files of OLMoE-1B-7B-0924 and MolmoE-1B-0924:
                {p}.gate.weight [E, D]; {p}.experts.{i}.gate_proj.weight [F, D],
                {p}.experts.{i}.up_proj.weight [F, D], {p}.experts.{i}.down_proj.weight [D, F]
  "fused"       transformers >= 5 in memory (`OlmoeExperts`; its loader fuses the hub tensors):
                {p}.gate.weight [E, D]; {p}.experts.gate_up_proj [E, 2F, D] (gate rows, then up);
                {p}.experts.down_proj [E, D, F]
  "megablocks"  official training checkpoints (spec §7.1, [M] `convert_hf_to_molmo.py`; the
                inverse of transformers' `convert_olmoe_weights_to_hf.py`):
                {p}.router.layer.weight [E, D]; {p}.experts.mlp.w1 [E*F, D] (gate_proj of
                expert 0, 1, ...); {p}.experts.mlp.v1 [E*F, D] (up_proj); {p}.experts.mlp.w2
                [E*F, D] (down_proj transposed)
"""
from __future__ import annotations

from typing import List

from molmo_jax.convert.links import CheckpointError, Link, Path, array_module, linear_link
from molmo_jax.model.config import LLMConfig

LAYOUTS = ("per_expert", "fused", "megablocks")


def _per_expert(keys: List[str], ours: Path, layer, in_dim: int, out_dim: int) -> Link:
    """One PyTorch weight [out, in] per expert <-> stacked kernel [E, in, out]."""
    n = len(keys)
    return Link(tuple(keys), (ours,), layer,
                lambda *ws: [array_module(*ws).stack([w.T for w in ws])],
                lambda k: [k[i].T for i in range(n)],
                lambda shape: [(out_dim, in_dim)] * n)


def _whole(key: str, ours: Path, layer, hf_shape, to_ours, to_hf) -> Link:
    """One checkpoint tensor <-> one of our arrays, by a reshape/transpose each way."""
    return Link((key,), (ours,), layer, lambda w: [to_ours(w)], lambda k: [to_hf(k)], lambda shape: [hf_shape])


def moe_links(c: LLMConfig, hf: str, ours: Path, layer: int, layout: str) -> List[Link]:
    """Router and experts of one block. `hf`: the block's MoE module prefix, e.g.
    "model.layers.3.mlp" (OLMoE), "model.transformer.blocks.3.mlp" (MolmoE),
    "transformer.blocks.3.ffn" (megablocks); `ours`: path of the MoEFeedForward."""
    d, e, f = c.d_model, c.moe_num_experts, c.moe_hidden_size
    if layout == "megablocks":
        def stacked_gate(w):  # [E*F, D] rows of expert i = its [F, D] weight
            return w.reshape(e, f, d).transpose(0, 2, 1)

        def flat_gate(k):
            return k.transpose(0, 2, 1).reshape(e * f, d)

        return [linear_link(f"{hf}.router.layer.weight", ours + ("router",), layer, (d,), (e,)),
                _whole(f"{hf}.experts.mlp.w1", ours + ("gate",), layer, (e * f, d), stacked_gate, flat_gate),
                _whole(f"{hf}.experts.mlp.v1", ours + ("up",), layer, (e * f, d), stacked_gate, flat_gate),
                _whole(f"{hf}.experts.mlp.w2", ours + ("down",), layer, (e * f, d),
                       lambda w: w.reshape(e, f, d), lambda k: k.reshape(e * f, d))]
    links = [linear_link(f"{hf}.gate.weight", ours + ("router",), layer, (d,), (e,))]
    if layout == "per_expert":
        def names(proj):
            return [f"{hf}.experts.{i}.{proj}.weight" for i in range(e)]

        return links + [_per_expert(names("gate_proj"), ours + ("gate",), layer, d, f),
                        _per_expert(names("up_proj"), ours + ("up",), layer, d, f),
                        _per_expert(names("down_proj"), ours + ("down",), layer, f, d)]
    if layout == "fused":
        gate_up = Link((f"{hf}.experts.gate_up_proj",), (ours + ("gate",), ours + ("up",)), layer,
                       lambda w: [w[:, :f].transpose(0, 2, 1), w[:, f:].transpose(0, 2, 1)],
                       lambda g, u: [array_module(g, u).concatenate([g.transpose(0, 2, 1), u.transpose(0, 2, 1)], axis=1)],
                       lambda sg, su: [(e, 2 * f, d)])
        down = _whole(f"{hf}.experts.down_proj", ours + ("down",), layer, (e, d, f),
                      lambda w: w.transpose(0, 2, 1), lambda k: k.transpose(0, 2, 1))
        return links + [gate_up, down]
    raise CheckpointError(f"unknown MoE checkpoint layout {layout!r}; choose from {LAYOUTS}")
