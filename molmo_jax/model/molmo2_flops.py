"""Analytic FLOPs of a Molmo2 forward pass (model FLOPs, for MFU), counted as model/flops.py
counts Molmo's: the ViT over every crop / frame of the batch, the adapter's mean-query pooling
and projector over every pooled token slot of the batch (padding included: the step computes
them), the decoder over every token.
"""
from __future__ import annotations

from typing import Dict

from molmo_jax.model.flops import llm_flops, pooling_flops, vit_flops
from molmo_jax.model.molmo2_config import Molmo2Config


def forward_flops(cfg: Molmo2Config, batch: int, seq_len: int, crops: int, pooled_tokens: int,
                  slots: int) -> Dict[str, float]:
    """`batch` rows of `seq_len` tokens, `crops` crops or frames and `pooled_tokens` pooled
    tokens of `slots` slots each -> {'vit', 'connector', 'llm', 'total'} ('connector' = the
    adapter)."""
    v, a = cfg.vision, cfg.adapter
    vit = vit_flops(cfg, batch * crops)
    adapter = float(batch * pooled_tokens * pooling_flops(v.width * len(v.feature_layers), a.num_heads * a.head_dim,
                                                          a.width, a.projector_hidden, cfg.llm.d_model, slots))
    lm = llm_flops(cfg.llm, batch, seq_len)
    return {"vit": vit, "connector": adapter, "llm": lm, "total": vit + adapter + lm}
