"""AdamW over three parameter groups (ViT, connector, LLM), each with its own schedule and clipping.

Recipe (spec §5.1): AdamW b1=0.9, b2=0.95, eps=1e-6, weight decay 0; per group a linear warmup
from 0 to the group's peak LR, then cosine decay to 10% of the peak at the last step; the
gradient norm is clipped to 1.0 separately in each group. Frozen parameters (the base token
embedding) are not part of the trained tree at all (see `split_trainable`), so they get no
gradient, no optimizer state and no update.

Parameter trees here are pure nested dicts (`nnx.State.to_pure_dict()`); paths are the keys
joined with "/", e.g. "llm/blocks/attn/q_proj/kernel".
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ("vit", "connector", "llm")


def path_str(path: Sequence[Any]) -> str:
    """jax tree path (DictKey/GetAttrKey/...) or a tuple of names -> "a/b/c"."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)


def group_of(path: str, patterns: Sequence[Tuple[str, str]]) -> str:
    """First (regex, group) whose regex matches the path (re.search) decides the group."""
    for regex, group in patterns:
        if re.search(regex, path):
            return group
    raise ValueError(f"parameter {path!r} matches none of config.optimizer.groups {list(patterns)}")


def split_trainable(params: Dict, frozen_regex: str) -> Tuple[Dict, Dict]:
    """Splits a nested param dict into (trainable, frozen) nested dicts by full-path regex."""
    trainable, frozen = {}, {}

    def visit(node, prefix, t, f):
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                t[k], f[k] = {}, {}
                visit(v, path, t[k], f[k])
                for d in (t, f):
                    if not d[k]:
                        del d[k]
            elif frozen_regex and re.fullmatch(frozen_regex, path):
                f[k] = v
            else:
                t[k] = v

    visit(params, "", trainable, frozen)
    return trainable, frozen


def merge_trees(a: Dict, b: Dict) -> Dict:
    """Inverse of `split_trainable`: the union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out else v
    return out


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> Callable:
    """LR at optimizer update number `count` (0-based), as the official `CosWithWarmup`.

    The official trainer increments its step before the first update, so update `count` uses
    step s = count + 1: lr = peak * s / warmup while s < warmup, then
    lr = final + (peak - final) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2, and final
    after `total_steps`.
    """
    final = peak * final_fraction

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * s / max(warmup_steps, 1)
        frac = jnp.clip((s - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < warmup_steps, warm, cosine)

    return schedule


def make_schedules(opt_cfg: Mapping[str, Any], total_steps: int) -> Dict[str, Callable]:
    return {g: warmup_cosine(opt_cfg[g]["lr"], opt_cfg[g]["warmup_steps"], total_steps, opt_cfg["final_lr_fraction"])
            for g in GROUPS}


def param_labels(params: Dict, patterns: Sequence[Tuple[str, str]]) -> Dict:
    """Tree of group names with the structure of `params`."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(path_str(p), patterns), params)


def make_optimizer(opt_cfg: Mapping[str, Any], total_steps: int, patterns: Sequence[Tuple[str, str]]
                   ) -> optax.GradientTransformation:
    """optax transformation over the trainable params: per group clip -> AdamW(schedule).

    opt_cfg: config.optimizer (b1, b2, eps, weight_decay, clip_norm, final_lr_fraction and
    per group {lr, warmup_steps}). The group LR lives in the optimizer state
    (`inject_hyperparams`), so `learning_rates` reads back exactly what was applied.
    """
    schedules = make_schedules(opt_cfg, total_steps)

    def group_tx(group):
        adamw = optax.inject_hyperparams(optax.adamw)(
            learning_rate=schedules[group], b1=opt_cfg["b1"], b2=opt_cfg["b2"], eps=opt_cfg["eps"],
            weight_decay=opt_cfg["weight_decay"])
        clip = optax.clip_by_global_norm(opt_cfg["clip_norm"]) if opt_cfg["clip_norm"] else optax.identity()
        return optax.chain(clip, adamw)

    return optax.multi_transform({g: group_tx(g) for g in GROUPS},
                                 lambda params: param_labels(params, patterns))


def learning_rates(opt_state: Any) -> Dict[str, jax.Array]:
    """Per-group learning rate of the last applied update, read from the optimizer state."""
    return {g: opt_state.inner_states[g].inner_state[1].hyperparams["learning_rate"] for g in GROUPS}


def group_grad_norms(grads: Dict, patterns: Sequence[Tuple[str, str]]) -> Dict[str, jax.Array]:
    """Global L2 norm of each group's gradients (before clipping); 0 for an empty group."""
    labels = param_labels(grads, patterns)
    sq = {g: jnp.zeros((), jnp.float32) for g in GROUPS}
    for label, g in zip(jax.tree.leaves(labels), jax.tree.leaves(grads)):
        sq[label] = sq[label] + jnp.sum(jnp.square(g.astype(jnp.float32)))
    return {g: jnp.sqrt(v) for g, v in sq.items()}
