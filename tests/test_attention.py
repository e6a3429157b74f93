"""Attention backends against the reference einsum, forward and gradient, on every mask kind
the models use (causal, right padding, subsegments, KV-cache offsets, bidirectional blocks,
grouped kv heads, T != S, lengths off the block grid), the structural mask against the spec,
the chunked backend's compiled memory on a long sequence, the backend choice, and the
trainer's losses with each backend that runs on CPU."""
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np
import pytest
from flax import nnx

import configs
from configs import common
from molmo_jax.model import config as cfg
from molmo_jax.model import sharding
from molmo_jax.model.attention import (AttentionMask, _reference_attention, dot_product_attention,
                                       select_implementation, target_platform)
from molmo_jax.model.attention_chunked import chunked_attention
from molmo_jax.model.attention_kernels import cudnn_arguments, cudnn_attention, splash_attention
from molmo_jax.model.layers import REMAT_POLICIES
from molmo_jax.model.llm import LLM
from molmo_jax.train import trainer


def _mask_cases():
    """name -> (T, S, N, K, AttentionMask or None) on a batch of 2."""
    s = 37
    padded = np.ones((2, s), bool)
    padded[1, 29:] = False
    sub = np.full((2, s), 10000)
    sub[:, 11:23], sub[:, 23:] = 1, 2
    sub[1, 29:] = -1  # padding, as the data pipeline writes it
    blocks = np.zeros((2, s), np.int32)
    blocks[:, 1:9], blocks[1, 12:20] = 1, 2  # image tokens; a second image in example 1
    cache_valid = np.ones((2, 24), bool)
    cache_valid[0, 5:8] = False  # a shorter prompt's padding slots
    cache_valid[:, 19:] = False  # slots not written yet
    empty = padded.copy()
    empty[0] = False  # an all-padding example: rows with no allowed key
    return {
        "no_mask": (s, s, 4, 2, None),
        "causal": (s, s, 4, 2, AttentionMask()),
        "right_padding": (s, s, 4, 2, AttentionMask(key_valid=padded)),
        "subsegments": (s, s, 4, 2, AttentionMask(key_valid=padded, subsegment_ids=sub)),
        "bidirectional_blocks": (s, s, 4, 2, AttentionMask(key_valid=padded, block_ids=blocks)),
        "blocks_and_subsegments": (s, s, 4, 4, AttentionMask(key_valid=padded, subsegment_ids=sub,
                                                               block_ids=blocks)),
        "kv_cache_prefill": (13, 24, 4, 1, AttentionMask(q_offset=3, key_valid=cache_valid)),
        "kv_cache_decode": (1, 24, 4, 2, AttentionMask(q_offset=18, key_valid=cache_valid)),
        "fully_masked_rows": (s, s, 2, 1, AttentionMask(key_valid=empty)),
    }


CASES = _mask_cases()


def _inputs(t, s, n, kv, h=8, seed=0):
    r = np.random.RandomState(seed)
    return tuple(jnp.asarray(r.randn(*shape), jnp.float32)
                 for shape in ((2, t, n, h), (2, s, kv, h), (2, s, kv, h), (2, t, n, h)))


def _live_rows(mask, t, s, padding_queries=True):
    """bool[2, T]: queries with at least one allowed key, without padding queries unless
    `padding_queries` (the model reads neither)."""
    live = np.ones((1, t), bool) if mask is None else np.asarray(mask.dense(t, s)).any(-1)
    if not padding_queries and mask is not None and mask.key_valid is not None:
        live = live & np.asarray(mask.key_valid)[:, mask.q_offset + np.arange(t)]
    return np.broadcast_to(live, (2, t))


def _compare_with_reference(fn, mask, qkv, cotangent, live, tol=1e-5):
    """fn(q, k, v) against the einsum at the live rows, and its q/k/v gradients everywhere."""
    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cotangent), argnums=(0, 1, 2)))(*qkv)

    ref = lambda q, k, v: _reference_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(*qkv))[live], np.asarray(ref(*qkv))[live],
                               atol=tol, rtol=tol)
    for name, want, got in zip("qkv", grads(ref), grads(fn)):
        assert np.isfinite(np.asarray(got)).all(), name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("skip_empty_tiles", [True, False], ids=["skip", "every_tile"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_equals_reference_forward_and_gradient(case, skip_empty_tiles):
    """Both ways of the chunked kernel: skipping empty tiles (CPU) and computing every tile
    (accelerators, attention_chunked.py)."""
    t, s, n, kv, mask = CASES[case]
    q, k, v, cotangent = _inputs(t, s, n, kv)
    live = _live_rows(mask, t, s)
    cotangent = cotangent * live[:, :, None, None]  # the loss never reaches rows with no key

    def chunked(q, k, v):  # blocks even without a mask (single_tile=0)
        return chunked_attention(q, k, v, mask, block_q=8, block_k=16, single_tile=0,
                                 skip_empty_tiles=skip_empty_tiles)

    _compare_with_reference(chunked, mask, (q, k, v), cotangent, live)


def test_chunked_kernel_skips_tiles_behind_a_cond_on_cpu_only():
    """On CPU the chunked kernel skips empty tiles with lax.cond; traced for TPU it has no cond
    (the TPU compiler kept every tile's logits and probabilities of a layer around the cond:
    324 GiB in the Molmo2-4B long-context step), forward and backward."""
    q, k, v, _ = _inputs(64, 64, 4, 2)
    mask = AttentionMask(causal=True, block_ids=jnp.zeros((2, 64), jnp.int32))

    def program(platform):  # the printed jaxpr holds the nested loop and cond bodies too
        def loss(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, mask, implementation="chunked"))
        with target_platform(platform):
            return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))

    cpu, tpu = program("cpu"), program("tpu")
    assert cpu.count(" cond[") >= 2  # the forward's and the backward's skip
    assert " cond[" not in tpu and " scan[" in tpu


def test_unmasked_single_tile_equals_reference_and_keeps_no_probabilities():
    """The ViT's case: no mask, T = S = 577 (336 px / 14 + CLS), one tile without mask arrays.
    Forward and gradients equal the einsum, and the saved residuals hold no [T, S] array. Two
    query heads per kv head: the tiles run per (example, kv head) and must put every head back."""
    t, n, h = 577, 4, 8
    q, k, v, cotangent = _inputs(t, t, n, 2, h=h)
    single = lambda q, k, v: chunked_attention(q, k, v, None)  # noqa: E731
    _compare_with_reference(single, None, (q, k, v), cotangent, np.ones((2, t), bool))
    loss = lambda q, k, v: jnp.sum(single(q, k, v) * cotangent)  # noqa: E731
    saved = jax.vjp(loss, q, k, v)[1]
    shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(saved) if hasattr(leaf, "shape")]
    assert shapes and all(np.prod(shape) < 2 * t * n * h * 4 for shape in shapes), shapes


def test_chunked_single_block_and_bfloat16_inputs():
    """Blocks longer than the sequence (one tile), and bf16 q/k/v (float32 softmax inside)."""
    t, s, n, kv, mask = CASES["subsegments"]
    q, k, v, _ = _inputs(t, s, n, kv)
    want = _reference_attention(q, k, v, mask)
    np.testing.assert_allclose(chunked_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = chunked_attention(*bf, mask, block_q=8, block_k=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


def test_mask_follows_the_spec():
    """allowed[i, j] = valid[j] & (i >= j or same nonzero block) & sub[i] <= sub[j], with queries at
    slot q_offset + i, checked entry by entry against a loop over the definition."""
    r = np.random.RandomState(3)
    s, t, offset = 12, 5, 6
    valid = r.rand(2, s) > 0.2
    sub = r.choice([1, 2, 10000], (2, s))
    blocks = r.choice([0, 0, 1, 2], (2, s))
    got = np.asarray(AttentionMask(q_offset=offset, key_valid=valid, subsegment_ids=sub,
                                   block_ids=blocks).dense(t, s))
    for b in range(2):
        for i in range(t):
            qi = offset + i
            for j in range(s):
                same_block = blocks[b, qi] != 0 and blocks[b, qi] == blocks[b, j]
                want = valid[b, j] and (qi >= j or same_block) and sub[b, qi] <= sub[b, j]
                assert got[b, i, j] == want, (b, i, j)
    assert np.asarray(AttentionMask(causal=False).dense(3, 4)).all()


def test_unknown_implementation_is_refused():
    q = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*'chunked'"):
        dot_product_attention(q, q, q, implementation="flash")


def _select(name, t, s, mask, platform, dtype=jnp.float32, head_dim=64):
    q = jax.ShapeDtypeStruct((2, t, 4, head_dim), dtype)
    return select_implementation(name, q, jax.ShapeDtypeStruct((2, s, 2, head_dim), dtype), mask, platform)


def test_backend_selection_per_platform_and_mask():
    causal, packed = CASES["right_padding"][4], CASES["subsegments"][4]
    decode, blocks = CASES["kv_cache_decode"][4], CASES["bidirectional_blocks"][4]
    assert _select("auto", 512, 512, causal, "cpu") == "reference"  # one tile
    assert _select("auto", 577, 577, None, "cpu") == "chunked"  # a ViT crop: recompute, not keep, its probabilities
    assert _select("auto", 1, 4, None, "cpu") == "reference"  # a pooling window
    assert _select("auto", 577, 577, None, "tpu") == _select("auto", 577, 577, None, "gpu") == "reference"
    assert _select("auto", 1024, 1024, causal, "cpu") == "chunked"
    assert _select("auto", 1024, 1024, causal, "tpu") == "splash"
    assert _select("auto", 1024, 1024, causal, "gpu", jnp.bfloat16) == "cudnn"
    assert _select("auto", 1024, 1024, causal, "gpu") == "reference"  # cuDNN flash takes half precision
    assert _select("auto", 1024, 1024, causal, "gpu", jnp.bfloat16, head_dim=160) == "reference"
    assert _select("auto", 8192, 8192, packed, "tpu") == "chunked"  # subsegments: no segment ids for them
    assert _select("auto", 1024, 1024, packed, "tpu") == "reference"
    for name in ("splash", "cudnn"):
        assert _select(name, 1024, 1024, causal, "tpu") == name
        for mask in (packed, decode, blocks):
            assert _select(name, 1 if mask is decode else 1024, 1024, mask, "tpu") == "chunked"
    assert _select("chunked", 16, 16, None, "cpu") == "chunked"


@pytest.mark.parametrize("case", ["no_mask", "right_padding", "fully_masked_rows"])
def test_cudnn_arguments_equal_reference(case):
    """The argument mapping of the cuDNN backend, run by jax.nn.dot_product_attention's XLA path
    (cuDNN itself needs a GPU): causal -> is_causal, key validity -> key_value_seq_lengths."""
    t, s, n, kv, mask = CASES[case]
    q, k, v, cotangent = _inputs(t, s, n, kv)
    live = _live_rows(mask, t, s)
    cotangent = cotangent * live[:, :, None, None]

    def xla(q, k, v):
        return jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, mask), implementation="xla")

    _compare_with_reference(xla, mask, (q, k, v), cotangent, live)


def test_cudnn_refuses_what_it_cannot_express():
    t, s, n, kv, mask = CASES["subsegments"]
    q, k, v, _ = _inputs(t, s, n, kv)
    with pytest.raises(ValueError, match="'cudnn' cannot express subsegment ids"):
        cudnn_arguments(q, k, v, mask)
    with pytest.raises(ValueError, match="'cudnn' needs a GPU; this is 'cpu'"):
        dot_product_attention(q, k, v, CASES["causal"][4], implementation="cudnn")
    holes = np.ones((2, s), bool)
    holes[0, 3] = False  # not right padding: cuDNN's sequence lengths cannot say it
    out = cudnn_attention(q, k, v, AttentionMask(key_valid=holes), implementation="xla")
    assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1])).all()


@pytest.mark.parametrize("case,t", [("right_padding", None), ("no_mask", None), ("fully_masked_rows", None),
                                    ("causal", 200)])
def test_splash_in_interpret_mode_equals_reference(case, t):
    """The TPU kernel run by the Pallas interpreter, forward and gradient; lengths off the
    128 grid, one tile (37 tokens) and two tiles (200 tokens, block 128)."""
    t0, s, n, kv, mask = CASES[case]
    t = t or t0
    q, k, v, cotangent = _inputs(t, t, n, kv)
    live = _live_rows(mask, t, t, padding_queries=False)  # splash gives them the padding keys
    cotangent = cotangent * live[:, :, None, None]

    def splash(q, k, v):
        return splash_attention(q, k, v, mask, block=128, interpret=True)

    _compare_with_reference(splash, mask, (q, k, v), cotangent, live)


def test_chunked_memory_is_bounded_on_a_long_sequence():
    """Forward + gradient at T = S = 8192: the chunked backend's compiled temp memory stays far
    below one head's [T, S] float32 logits; the einsum's exceeds them (it holds several)."""
    b, t, n, kv, h = 1, 8192, 2, 1, 16
    logits_bytes = t * t * 4
    sd = jax.ShapeDtypeStruct
    mask = AttentionMask(key_valid=sd((b, t), bool), subsegment_ids=sd((b, t), jnp.int32))
    temp = {}
    for name in ("chunked", "reference"):
        def loss(q, k, v, mask, name=name):
            return jnp.sum(dot_product_attention(q, k, v, mask, implementation=name) ** 2)
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            sd((b, t, n, h), jnp.float32), sd((b, t, kv, h), jnp.float32), sd((b, t, kv, h), jnp.float32),
            mask).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["chunked"] < logits_bytes / 8, temp
    assert temp["reference"] > logits_bytes, temp


@nnx.jit(static_argnums=0)
def _llm_logits(steps, llm, ids):
    """Prefill of ids[:, :-steps] into a cache, then `steps` single-token decodes; and the logits
    of the full sequence without a cache."""
    valid = ids != -1
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    full, _, _ = llm(llm.embed_tokens(ids), positions, token_valid=valid)
    cache = llm.init_cache(ids.shape[0], ids.shape[1])
    p = ids.shape[1] - steps
    logits, cache, _ = llm(llm.embed_tokens(ids[:, :p]), positions[:, :p], token_valid=valid[:, :p], cache=cache)
    decoded = [logits]
    for i in range(p, ids.shape[1]):
        logits, cache, _ = llm(llm.embed_tokens(ids[:, i:i + 1]), positions[:, i:i + 1],
                               token_valid=valid[:, i:i + 1], cache=cache)
        decoded.append(logits)
    return full, jnp.concatenate(decoded, axis=1)


def test_llm_with_chunked_attention_equals_reference():
    """The decoder through both backends, without and with a KV cache (prefill + decode)."""
    ids = np.random.RandomState(4).randint(0, 512, (2, 11)).astype(np.int32)
    ids[1, 6:8] = -1
    outputs = {}
    for name in ("reference", "chunked"):
        llm = LLM(cfg.TINY_QWEN2.llm, attention=name, rngs=nnx.Rngs(0))
        outputs[name] = [np.asarray(x) for x in _llm_logits(3, llm, ids)]
    live = ids != -1
    for want, got in zip(outputs["reference"], outputs["chunked"]):
        np.testing.assert_allclose(got[live], want[live], atol=1e-5, rtol=1e-5)


def test_model_config_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown model.attention 'flash'; choose from"):
        cfg.TINY_QWEN2.replace(attention="flash")


def test_trainer_losses_are_equal_with_each_cpu_backend():
    """Three AdamW steps of the tiny Molmo: on packed, right-padded text (two conversations per
    row, 600 tokens: two tiles of the chunked kernel) with the einsum, chunked and auto; on
    right-padded text without subsegments (128 tokens, one splash tile) with the einsum and
    splash (interpreted).
    Every backend gives the einsum's losses and gradient norms."""
    config = configs.load("configs/demo.py:pretrain")
    config.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    rng = np.random.default_rng(0)

    def batch(t, packed):
        ids = rng.integers(0, 500, (2, t)).astype(np.int32)
        ids[1, t * 3 // 4:] = -1
        arrays = {"input_ids": ids, "target_tokens": np.roll(ids, -1, 1),
                  "loss_masks": ((rng.random((2, t)) < 0.6) & (ids != -1)).astype(np.float32)}
        if packed:
            sub = np.where(np.arange(t) < t // 3, 10000, np.where(np.arange(t) < 2 * t // 3, 1, 2))
            arrays["subsegment_ids"] = np.repeat(sub[None], 2, 0).astype(np.int32)
        return sharding.make_global_batch(arrays, mesh)

    batches = {"packed": batch(600, True), "padded": batch(128, False)}
    runs = {"packed": ("reference", "chunked", "auto"), "padded": ("reference", "splash")}
    initial = None  # the parameters do not depend on the backend: initialise once
    for kind, names in runs.items():
        metrics_by_backend = {}
        for name in names:
            config.model = common.model_config(cfg.TINY_QWEN2, attention=name)
            setup = trainer.build_train_setup(config, trainer.model_config_from(config), mesh)
            initial = setup.init(jax.random.key(0)) if initial is None else initial
            state, metrics_by_backend[name] = jax.tree.map(jnp.copy, initial), []  # the step donates its state
            for _ in range(3):
                state, metrics = setup.step_fn(state, batches[kind])
                metrics_by_backend[name].append([float(metrics[k]) for k in ("loss", "grad_norm.llm")])
        for name in names[1:]:
            np.testing.assert_allclose(metrics_by_backend[name], metrics_by_backend["reference"], rtol=1e-5,
                                       err_msg=f"{name} on {kind}")


def test_dots_and_attention_remat_keeps_the_attention_and_not_its_logits(capsys):
    """Under the "dots_and_attention" policy the chunked kernel's output and row max / sum are
    saved for the backward pass (named), and nothing of [T, S] size is."""
    t = 1024
    q, k = jnp.ones((1, t, 2, 16)), jnp.ones((1, t, 1, 16))

    def f(q, k):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, k, AttentionMask(), implementation="chunked")))

    print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES["dots_and_attention"]), q, k)
    saved = capsys.readouterr().out.splitlines()
    assert sum("named 'attention'" in line for line in saved) == 3, saved  # output, row max, row sum
    assert not any(f"{t},{t}" in line for line in saved), saved


def test_dots_and_attention_remat_gives_the_same_gradients():
    ids = np.random.RandomState(5).randint(0, 512, (2, 600)).astype(np.int32)
    ids[1, 500:] = -1
    grads = {}
    for policy in ("none", "dots_and_attention"):
        llm = LLM(cfg.TINY_QWEN2.llm, remat_policy=policy, attention="chunked", rngs=nnx.Rngs(0))

        @nnx.jit
        @nnx.grad
        def loss(llm):
            valid = ids != -1
            logits, _, _ = llm(llm.embed_tokens(ids), jnp.maximum(jnp.cumsum(valid, 1) - 1, 0), token_valid=valid)
            return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)[..., 0])

        grads[policy] = jax.tree.leaves(nnx.state(loss(llm)))
    for a, b in zip(grads["none"], grads["dots_and_attention"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
