"""Mixture-of-experts weights <-> PyTorch checkpoint layouts, one decoder layer at a time.

Our layout (`molmo_jax.model.moe.MoEFeedForward`, float32):
  router [D, E], gate [E, D, F], up [E, D, F], down [E, F, D]

Checkpoint layouts (PyTorch `nn.Linear.weight` is [out, in]):
  "per-expert" (HF hub files of OLMoE-1B-7B-0924 and MolmoE-1B-0924):
      {p}gate.weight [E, D]; {p}experts.{i}.gate_proj.weight [F, D],
      {p}experts.{i}.up_proj.weight [F, D], {p}experts.{i}.down_proj.weight [D, F]
      with p = "model.layers.N.mlp." (OLMoE) or "model.transformer.blocks.N.mlp." (MolmoE).
  "fused" (transformers >= 5 in memory, `OlmoeExperts`):
      {p}gate.weight [E, D]; {p}experts.gate_up_proj [E, 2F, D] (gate rows first, then up);
      {p}experts.down_proj [E, D, F]
  "megablocks" (official training checkpoints, spec §7.1, `convert_hf_to_molmo.py`):
      {p}router.layer.weight [E, D]; {p}experts.mlp.w1 [E*F, D] (gate_proj of expert 0, 1, ...);
      {p}experts.mlp.v1 [E*F, D] (up_proj); {p}experts.mlp.w2 [E*F, D] (down_proj.T)
      with p = "transformer.blocks.N.ffn.".

Readers pop the tensors they use from the state dict, so the caller can report leftovers.
"""
from __future__ import annotations

from typing import Dict, MutableMapping

import numpy as np

StateDict = MutableMapping[str, np.ndarray]


def _pop(sd: StateDict, key: str, shape=None) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"checkpoint has no tensor {key!r}")
    value = np.asarray(sd.pop(key), np.float32)
    if shape is not None and value.shape != tuple(shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {value.shape}, expected {tuple(shape)}")
    return value


def moe_from_hf(sd: StateDict, prefix: str, d_model: int, num_experts: int, hidden: int) -> Dict[str, np.ndarray]:
    """One layer's MoE from the per-expert or the fused HF layout (detected from the keys)."""
    e, d, f = num_experts, d_model, hidden
    router = _pop(sd, f"{prefix}gate.weight", (e, d)).T
    if f"{prefix}experts.gate_up_proj" in sd:
        gate_up = _pop(sd, f"{prefix}experts.gate_up_proj", (e, 2 * f, d))
        gate, up = gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1)
        down = _pop(sd, f"{prefix}experts.down_proj", (e, d, f)).transpose(0, 2, 1)
    else:
        def stack(name, shape):
            return np.stack([_pop(sd, f"{prefix}experts.{i}.{name}.weight", shape).T for i in range(e)])
        gate, up, down = stack("gate_proj", (f, d)), stack("up_proj", (f, d)), stack("down_proj", (d, f))
    return {"router": router, "gate": gate, "up": up, "down": down}


def moe_to_hf(params: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    """One layer's MoE in the per-expert HF layout (what the hub safetensors hold)."""
    out = {f"{prefix}gate.weight": np.asarray(params["router"]).T}
    for name, key in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        for i, w in enumerate(np.asarray(params[name])):
            out[f"{prefix}experts.{i}.{key}.weight"] = w.T
    return out


def moe_from_megablocks(sd: StateDict, prefix: str, d_model: int, num_experts: int,
                        hidden: int) -> Dict[str, np.ndarray]:
    """One layer's MoE from the megablocks dMoE training layout."""
    e, d, f = num_experts, d_model, hidden
    router = _pop(sd, f"{prefix}router.layer.weight", (e, d)).T
    gate = _pop(sd, f"{prefix}experts.mlp.w1", (e * f, d)).reshape(e, f, d).transpose(0, 2, 1)
    up = _pop(sd, f"{prefix}experts.mlp.v1", (e * f, d)).reshape(e, f, d).transpose(0, 2, 1)
    down = _pop(sd, f"{prefix}experts.mlp.w2", (e * f, d)).reshape(e, f, d)
    return {"router": router, "gate": gate, "up": up, "down": down}


def moe_to_megablocks(params: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    e, d, f = np.shape(params["gate"])
    return {
        f"{prefix}router.layer.weight": np.asarray(params["router"]).T,
        f"{prefix}experts.mlp.w1": np.asarray(params["gate"]).transpose(0, 2, 1).reshape(e * f, d),
        f"{prefix}experts.mlp.v1": np.asarray(params["up"]).transpose(0, 2, 1).reshape(e * f, d),
        f"{prefix}experts.mlp.w2": np.asarray(params["down"]).reshape(e * f, d),
    }
