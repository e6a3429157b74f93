"""Analytic FLOPs of a Molmo forward pass and training step (model FLOPs, for MFU).

Counts 2 FLOPs per multiply-add of every matmul the model needs, as in PaLM's appendix B:
  ViT       patch embedding, qkv / out projections, MLP, attention (T x T, full), for every
            crop of the batch (padding crops included: the step computes them), up to the
            deepest block whose output the connector reads.
  connector 2x2 mean-query attention pooling (q from the mean, k/v from the 4 features) and
            the SwiGLU projector, for 144 pooled tokens per crop.
  LLM       qkv / out projections, SwiGLU MLP or routed experts (top-k of them) + router,
            attention (L x L, or L x cache slots with a KV cache, counted in full: the XLA
            program computes the whole masked matrix), LM head.
Norms, RoPE, softmax, embedding lookups and the loss are left out (not matmuls; < 1%).
A training step (molmo_jax.train.metrics_logging.train_step_flops) is 3 forward passes' worth
for trained parts. Rematerialised recomputation is hardware work, not model work, and is not
counted.
"""
from __future__ import annotations

from typing import Dict, Optional

from molmo_jax.model.config import MolmoConfig


def vit_blocks_used(cfg: MolmoConfig) -> int:
    """Blocks up to the deepest connector feature layer (negative = from the end of the
    num_layers block outputs; -1 is the last block)."""
    n = cfg.vision.num_layers
    deepest = max(layer if layer >= 0 else n + layer for layer in cfg.vision.feature_layers)
    return deepest + 1


def vit_flops(cfg, crops: int) -> float:
    """The ViT over `crops` crops, up to the deepest feature layer (cfg: any config with
    .vision, Molmo or Molmo2)."""
    v = cfg.vision
    t = v.num_positions
    d = v.width
    vit_per_block = (2 * t * d * 3 * v.num_heads * v.head_dim  # q, k, v
                     + 2 * t * v.num_heads * v.head_dim * d    # out
                     + 2 * 2 * t * d * v.mlp_dim               # fc1, fc2
                     + 2 * 2 * t * t * v.num_heads * v.head_dim)  # q k^T, p v
    return float(crops * (2 * v.num_patches * v.patch_dim * d + vit_blocks_used(cfg) * vit_per_block))


def pooling_flops(feat: int, inner: int, out: int, hidden: int, d_model: int, slots: int) -> int:
    """One pooled token: mean-query attention over `slots` features of width `feat` (`inner`
    = heads x head dim, output width `out`), then the SwiGLU projector (`hidden` per half)."""
    return (2 * feat * inner                 # q from the window mean
            + 2 * 2 * slots * feat * inner   # k, v of the window
            + 2 * 2 * slots * inner          # q k^T, p v
            + 2 * inner * out                # out
            + 2 * 2 * out * hidden           # w1, w3
            + 2 * hidden * d_model)          # w2


def llm_flops(llm, batch: int, seq_len: int, kv_len: Optional[int] = None) -> float:
    """The decoder (an LLMConfig) over `batch` sequences of `seq_len` tokens (see forward_flops)."""
    dm, hd = llm.d_model, llm.head_dim
    q_width, kv_width = llm.n_heads * hd, llm.n_kv_heads * hd
    attn_proj = 2 * dm * (q_width + 2 * kv_width) + 2 * q_width * dm
    if llm.block_type == "moe":
        ffn = 2 * dm * llm.moe_num_experts + llm.moe_top_k * 3 * 2 * dm * llm.moe_hidden_size
    else:
        ffn = 2 * dm * llm.mlp_hidden_size + 2 * (llm.mlp_hidden_size // 2) * dm
    per_token = llm.n_layers * (attn_proj + ffn) + 2 * dm * llm.embedding_size
    kv_len = seq_len if kv_len is None else kv_len
    attention = llm.n_layers * 2 * 2 * seq_len * kv_len * q_width  # per sequence
    return float(batch * (seq_len * per_token + attention))


def forward_flops(cfg: MolmoConfig, batch: int, seq_len: int, num_crops: int,
                  kv_len: Optional[int] = None) -> Dict[str, float]:
    """FLOPs of one forward pass over `batch` sequences of `seq_len` tokens, each with
    `num_crops` image crops (0: text only). kv_len: keys each query attends to (default
    seq_len; a KV-cache call attends to all cache slots, e.g. a decode step is seq_len=1,
    num_crops=0, kv_len=cache length). Returns {'vit', 'connector', 'llm', 'total'}."""
    v = cfg.vision
    crops = batch * num_crops
    vit = vit_flops(cfg, crops)
    gh, gw = v.grid
    pooled = (-(-gh // cfg.connector.pool_h)) * (-(-gw // cfg.connector.pool_w))  # 144 for CLIP-336
    connector = crops * pooled * pooling_flops(v.width * len(v.feature_layers), v.num_heads * v.head_dim, v.width,
                                               cfg.projector_hidden, cfg.llm.d_model,
                                               cfg.connector.pool_h * cfg.connector.pool_w)
    lm = llm_flops(cfg.llm, batch, seq_len, kv_len)
    return {"vit": vit, "connector": float(connector), "llm": lm, "total": vit + connector + lm}


def params_count(cfg: MolmoConfig) -> Dict[str, int]:
    """Parameter counts {'vit', 'connector', 'llm', 'total'} (7B-D: 8,021,025,280 in total,
    the number in the official checkpoint index)."""
    v, llm = cfg.vision, cfg.llm
    d, inner = v.width, v.num_heads * v.head_dim
    vit_block = (3 * (d * inner + inner) + inner * d + d  # attention with biases
                 + d * v.mlp_dim + v.mlp_dim + v.mlp_dim * d + d  # MLP with biases
                 + 4 * d)  # two LayerNorms
    vit = (v.patch_dim * d + (d if v.patch_bias else 0)
           + v.num_positions * d + (d if v.use_cls_token else 0) + (2 * d if v.pre_ln else 0)
           + v.num_layers * vit_block)
    feat = d * len(v.feature_layers)
    hidden = cfg.projector_hidden
    connector = (2 * feat  # pad embeddings
                 + feat * inner + inner + 2 * (feat * inner + inner) + inner * d + d  # pooling
                 + 2 * d * hidden + hidden * llm.d_model)  # projector
    dm, hd = llm.d_model, llm.head_dim
    q_width, kv_width = llm.n_heads * hd, llm.n_kv_heads * hd
    attn = dm * (q_width + 2 * kv_width) + q_width * dm
    if llm.qkv_bias:
        attn += q_width + 2 * kv_width
    if llm.qk_norm:
        attn += q_width + kv_width
    if llm.block_type == "moe":
        ffn = dm * llm.moe_num_experts + llm.moe_num_experts * 3 * dm * llm.moe_hidden_size
    else:
        ffn = dm * llm.mlp_hidden_size + (llm.mlp_hidden_size // 2) * dm
    llm_params = (llm.n_layers * (attn + ffn + 2 * dm) + dm
                  + llm.total_vocab * dm + llm.embedding_size * dm)
    return {"vit": vit, "connector": connector, "llm": llm_params, "total": vit + connector + llm_params}
