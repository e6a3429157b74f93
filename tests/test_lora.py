"""LoRA / QLoRA (molmo_jax/model/lora.py) in the trainer, checkpoints, export and inference.

In-process (one compiled step per base dtype, on one CPU device, text-only batches):
  count      the trainable parameters and optimizer moments are exactly the adapters';
  overfit    a LoRA run learns a small set while every base parameter stays bit-identical;
  QLoRA      the same with an int8 or nf4 base: the loss falls; nf4 round trip within the grid's bound;
  dropout    LoRA dropout changes training steps (deterministically), never evaluation.
Subprocess runs (test_trainer.py's tiny config and helpers, on a base checkpoint written here):
  checkpoints  hold the adapters, optimizer state and step only, and name their base;
  killed       SIGKILLed after checkpoint 4 and resumed: bit-identical to the uninterrupted run;
  other base   resuming on another base stops with one error naming both, changing nothing;
  merged       export --merge-lora: logits of the plain folder == base + adapters unmerged;
  predictor    loads a LoRA checkpoint as base + adapters, unmerged; int8 / nf4 weight-only inference.
"""
import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from test_trainer import (CONFIG_FILE, REPO, STEPS, kill_at_checkpoint_4_then_resume, make_tokenizer, metrics,
                          one_device, run, saved_state, tree_hashes)

import configs
from configs import common
from data_pipelines.pipeline import crop_fields
from molmo_jax.model import lora, quantization, sharding
from molmo_jax.convert import hf_molmo
from molmo_jax.convert.export_formats import ExportError
from molmo_jax.inference.predictor import load_orbax_model, with_compute_dtype
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.tools import aot
from molmo_jax.tools.logits import compute_logits
from molmo_jax.train import config_checks, hf_interop, trainer
from molmo_jax.train import optimizer as opt_lib
from molmo_jax.train.checkpointing import Checkpointer
from molmo_jax.train.export_verify import random_batch

RANK = 4


def lora_config(base_dtype="float32", targets=("llm_attention", "llm_mlp")):
    """The tiny demo config with LoRA on; a high LR and few steps, so a small set is learnt fast."""
    cfg = configs.load("configs/demo.py:pretrain")
    cfg.model = common.model_config(TINY_QWEN2)
    cfg.model.init_scheme = "fan_in"  # a random base whose activations are at unit scale
    cfg.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    cfg.lora.update(dict(rank=RANK, alpha=8.0, targets=targets, base_dtype=base_dtype))
    cfg.train.total_steps = 30
    for group in ("vit", "connector", "llm"):
        cfg.optimizer[group] = dict(lr=1e-2, warmup_steps=1)
    return cfg


def pattern_batch(mesh):
    """4 rows of an arithmetic token sequence (step 5 mod 16): learnable from the text alone."""
    start = np.random.default_rng(0).integers(0, 16, (4, 1))
    ids = ((start + 5 * np.arange(33)) % 16 + 100).astype(np.int32)
    return sharding.make_global_batch({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:],
                                       "loss_masks": np.ones((4, 32), np.float32)}, mesh)


def run_steps(cfg, steps):
    """(initial state, final state, losses) of `steps` updates on pattern_batch."""
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
    setup = trainer.build_train_setup(cfg, trainer.model_config_from(cfg), mesh)
    batch = pattern_batch(mesh)
    state = setup.init(jax.random.key(0))
    initial = jax.device_get(state)
    losses = []
    for _ in range(steps):
        state, m = setup.step_fn(state, batch)
        losses.append(float(m["loss"]))
    return initial, jax.device_get(state), losses


def analytic_adapter_count(llm, rank):
    """Adapters on q, k, v, o and gate, up, down of every LLM block: rank * (fan_in + fan_out) each."""
    d, q, kv, f = llm.d_model, llm.n_heads * llm.head_dim, llm.n_kv_heads * llm.head_dim, llm.mlp_hidden_size // 2
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
    return llm.n_layers * rank * per_layer


def sizes(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree) if np.ndim(x) > 0)


def test_trainable_parameters_and_optimizer_moments_are_exactly_the_adapters():
    cfg = lora_config()
    model_cfg = trainer.model_config_from(cfg)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
    setup = trainer.build_train_setup(cfg, model_cfg, mesh)
    params, opt_state = setup.abstract_state["params"], setup.abstract_state["opt_state"]
    expected = analytic_adapter_count(model_cfg.llm, RANK)
    assert sizes(params) == expected
    paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert paths and all(p.startswith("llm/blocks/") and p.split("/")[-2] == "adapter" for p in paths), paths
    assert sizes(opt_state) == 2 * expected  # Adam's two moments, of the adapters alone
    # The frozen base is the whole plain model.
    plain = lora.LoraConfig()
    plain_count = sum(int(np.size(x)) for x in jax.tree.leaves(
        nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: lora.build(model_cfg, plain, nnx.Rngs(0)))))))
    assert sizes(setup.abstract_state["frozen"]) == plain_count


@pytest.mark.parametrize("key, value, message", [
    ("targets", ("llm_attn",), "config.lora.targets: target 'llm_attn' matches no layer of this model; use a preset"),
    ("targets", ("llm/blocks/(q",), "config.lora.targets: target 'llm/blocks/(q' is not a regex"),
    ("rank", -1, "config.lora.rank=-1: expected an integer >= 0"),
    ("base_dtype", "fp8", "config.lora.base_dtype='fp8': choose one of float32, bfloat16, int8"),
    ("alpha", 0.0, "config.lora.alpha=0.0: expected a finite number > 0"),
    ("dropout", -0.1, "config.lora.dropout=-0.1: expected a number in [0, 1)"),
    ("dropout", 1.0, "config.lora.dropout=1.0: expected a number in [0, 1)"),
])
def test_each_bad_lora_value_is_one_line_naming_it(key, value, message):
    cfg = lora_config()
    cfg.lora[key] = value
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_quantized_base_without_adapters_is_refused():
    cfg = lora_config("int8")
    cfg.lora.rank = 0
    with pytest.raises(config_checks.ConfigError, match=r"^config\.lora\.base_dtype='int8' needs config\.lora\.rank > 0"):
        config_checks.validate(cfg)


@functools.lru_cache(maxsize=None)
def trained(base_dtype):
    """run_steps of 20 steps of lora_config(base_dtype), computed once per module."""
    return run_steps(lora_config(base_dtype), 20)


@pytest.mark.parametrize("base_dtype", ["float32", "int8", "nf4"])
def test_lora_learns_a_small_set_and_leaves_the_base_bit_identical(base_dtype):
    initial, final, losses = trained(base_dtype)
    assert losses[-1] < 0.3 * losses[0], losses
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(initial["frozen"])[0],
                            jax.tree.leaves(final["frozen"])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial["params"]),
                                                        jax.tree.leaves(final["params"]))]
    assert all(changed)
    if base_dtype == "int8":
        q = final["frozen"]["llm"]["blocks"]["attention"]["q"]
        assert q["kernel"].dtype == np.int8 and q["kernel_scale"].dtype == np.float32
    if base_dtype == "nf4":  # codes in the kernel's shape, one scale per 64 inputs (d_model 64)
        q = final["frozen"]["llm"]["blocks"]["attention"]["q"]
        assert q["kernel"].dtype == jax.numpy.uint4 and q["kernel_scale"].shape == (2, 1, 4, 16)


# The 16 NF4 code values, QLoRA paper (arXiv 2305.14314) appendix E.
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


@pytest.mark.parametrize("shape, n_in, n_out, block", [
    ((2, 128, 4, 16), 1, 2, 64),  # stacked q [layers, D, N, H]: blocks of 64 along D
    ((4, 16, 96), 2, 1, 16),  # o [N, H, D]: blocks along H, which is 16
    ((588, 32), 1, 1, 49)])  # the patch embedding: 49 is the largest divisor of 588 up to 64
def test_nf4_round_trip_is_within_the_grid_bound(shape, n_in, n_out, block):
    """Every value dequantizes to scale * one of the paper's 16 codes, scale = its block's absmax,
    and the error is at most half the widest gap between neighbouring codes times that absmax."""
    w = jax.random.normal(jax.random.key(0), shape) * 0.02
    codes, scale = quantization.quantize_kernel(w, n_in, n_out, "nf4")
    assert codes.dtype == jax.numpy.uint4 and codes.shape == w.shape
    axis = len(shape) - n_out - 1
    assert scale.shape == shape[:axis] + (shape[axis] // block,) + shape[axis + 1:]
    w, scale = np.asarray(w), np.asarray(scale)
    absmax = np.repeat(scale, block, axis=axis)
    blocks = np.abs(w).reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    np.testing.assert_allclose(scale, blocks.max(axis=axis + 1), rtol=1e-6)
    got = np.asarray(quantization.dequantize(codes, jax.numpy.asarray(scale), jax.numpy.float32))
    np.testing.assert_allclose(got, absmax * np.asarray(NF4_PAPER, np.float32)[np.asarray(codes, np.int32)],
                               rtol=1e-6)
    half_gap = np.max(np.diff(NF4_PAPER)) / 2
    assert np.all(np.abs(got - w) <= half_gap * absmax * (1 + 1e-6))


def test_lora_dropout_changes_training_deterministically_and_never_evaluation():
    """dropout 0.5: the first step equals the dropout-0 run's (b starts at zero, so the adapter path
    adds nothing yet), later steps differ from it, a rerun from the same seed repeats them bit for
    bit, and the model without a training step's keys (evaluation, predict) computes no dropout."""
    cfg = lora_config()
    cfg.lora.dropout = 0.5
    _, final, losses = run_steps(cfg, 4)
    _, _, again = run_steps(cfg, 4)
    assert losses == again
    no_dropout = trained("float32")[2][:4]
    assert losses[0] == no_dropout[0] and all(a != b for a, b in zip(losses[1:], no_dropout[1:])), (losses, no_dropout)

    model_cfg = trainer.model_config_from(cfg)
    params = opt_lib.merge_trees(final["params"], final["frozen"])
    batch = trainer.loss_batch(pattern_batch(sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])))
    with_dropout = lora_model(model_cfg, trainer.lora_config_from(cfg), params)
    without = lora_model(model_cfg, dataclasses.replace(trainer.lora_config_from(cfg), dropout=0.0), params)
    evaluated = [trainer.token_loss_sums(m, batch, 0.0)[0]["ce_sum"] for m in (with_dropout, without)]
    assert evaluated[0] == evaluated[1]
    key = jax.random.key(1)
    training = [trainer.token_loss_sums(m, batch, 0.0, dropout_key=key)[0]["ce_sum"] for m in (with_dropout, without)]
    assert training[1] == evaluated[1] and training[0] != evaluated[0]


# ------------------------------------------------------------------ runs of `python -m molmo_jax.train`
# The tiny trainer config of test_trainer.py with LoRA on (dropout 0.1, so that the kill -9 test
# covers its masks too), starting from a base checkpoint written here; one device, one persistent
# compilation cache for every run.

LORA_FILE = '''
import configs

def get_config(arg=None):
    c = configs.load({plain!r})
    c.lora.update(dict(rank={rank}, alpha=8.0, dropout=0.1, targets=("llm_attention", "llm_mlp", "connector")))
    c.init.checkpoint = {base!r}
    return c
'''


def write_base(cfg, directory, seed, tokenizer):
    """A trainer checkpoint (step 3) of the plain model with the random init of `seed`."""
    model_cfg = trainer.model_config_from(cfg)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
    state = trainer.build_train_setup(cfg, model_cfg, mesh).init(jax.random.key(seed))
    saver = Checkpointer(str(directory), async_save=False)
    saver.save(3, state, None, {"step": 3, "model": model_cfg.to_dict(), "tokenizer": tokenizer,
                                "crop": crop_fields(cfg)})
    saver.close()
    return str(directory)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(root, env, the uninterrupted run's workdir): bases "base" and "other_base" (another
    init), the LoRA config files, and the 12-step LoRA run on "base"."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = make_tokenizer(root)
    (root / "plain.py").write_text(CONFIG_FILE.format(tokenizer=tokenizer, steps=STEPS, tensor=1))
    plain = configs.load(str(root / "plain.py"))
    for name, seed in (("base", 1), ("other_base", 2)):
        base = write_base(plain, root / name / "checkpoints", seed, tokenizer)
        (root / f"lora_{name}.py").write_text(LORA_FILE.format(plain=str(root / "plain.py"), rank=RANK, base=base))
    env = one_device(dict(os.environ, PYTHONPATH=str(REPO)), root)
    workdir = root / "uninterrupted"
    run(root / "lora_base.py", env, workdir)
    return root, env, workdir


def test_checkpoints_hold_the_adapters_and_name_their_base(lora_runs):
    root, _, workdir = lora_runs
    saved = saved_state(workdir, STEPS)
    assert "frozen" not in saved
    paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]]
    assert paths and all(p.split("/")[-2] == "adapter" for p in paths)
    meta = json.loads((workdir / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())["lora"]
    assert meta["base"] == str(root / "base" / "checkpoints") and meta["base_step"] == 3
    assert meta["rank"] == RANK and meta["dropout"] == 0.1 and re.fullmatch(r"[0-9a-f]{16}", meta["base_fingerprint"])
    losses = [m["loss"] for _, m in sorted(metrics(workdir).items())]
    assert losses[-1] < losses[0], losses


def test_kill9_then_resume_with_adapters_is_bit_exact(lora_runs):
    root, env, reference = lora_runs
    workdir = root / "killed"
    killed_steps, log = kill_at_checkpoint_4_then_resume(root / "lora_base.py", env, workdir)
    resumed_from = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert 4 <= resumed_from <= max(killed_steps)
    ref, got = metrics(reference), metrics(workdir)
    for s in range(resumed_from + 1, STEPS + 1):
        assert got[s] == ref[s], s
    a, b = saved_state(reference, STEPS), saved_state(workdir, STEPS)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_resuming_adapters_on_another_base_is_one_error_and_changes_nothing(lora_runs):
    root, env, workdir = lora_runs
    before = tree_hashes(workdir)
    log = run(root / "lora_other_base.py", env, workdir, expect=1)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-4000:]
    assert re.search(rf"checkpoint \S+/{STEPS} holds adapters of another base: it records base "
                     rf"{re.escape(str(root / 'base' / 'checkpoints'))} \(float32, fingerprint [0-9a-f]{{16}}\), this "
                     rf"run's base is {re.escape(str(root / 'other_base' / 'checkpoints'))} \(float32, fingerprint "
                     r"[0-9a-f]{16}\)\. Nothing was changed", errors[0]), errors[0]
    assert tree_hashes(workdir) == before


def lora_model(model_cfg, lora_cfg, params):
    """A LoRA Molmo (float32 compute) holding `params` (pure dict: base + adapters)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: lora.build(model_cfg.replace(dtype="float32"), lora_cfg,
                                                                  nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def test_merged_export_has_the_logits_of_base_plus_adapters_and_reads_back(lora_runs, tmp_path):
    """export --merge-lora: a plain Molmo folder whose logits are those of the unmerged base +
    adapters (within 1e-5, float32) and whose tensors read back (HF reader) as the merged params."""
    root, _, workdir = lora_runs
    with pytest.raises(ExportError, match=r"holds LoRA adapters only .* with --merge-lora$"):
        hf_interop.export_checkpoint(str(workdir / "checkpoints"), str(tmp_path / "plain"))
    out = hf_interop.export_checkpoint(str(workdir / "checkpoints"), str(tmp_path / "merged"), merge_lora=True)

    base, adapters = saved_state(root / "base", 3), saved_state(workdir, STEPS)["params"]
    model_cfg = trainer.model_config_from(configs.load(str(root / "lora_base.py")))
    lora_cfg = lora.LoraConfig(rank=RANK, alpha=8.0, targets=("llm_attention", "llm_mlp", "connector"))
    plain = opt_lib.merge_trees(base["params"], base["frozen"])
    params = opt_lib.merge_trees(plain, adapters)
    batch = random_batch(model_cfg)
    unmerged = compute_logits(lora_model(model_cfg, lora_cfg, params), batch)
    exported = compute_logits(hf_molmo.load_hf_model(out, dtype="float32"), batch)
    assert np.max(np.abs(exported - unmerged)) < 1e-5
    base_alone = compute_logits(lora_model(model_cfg, lora.LoraConfig(), plain), batch)  # rank 0: no adapters
    assert np.max(np.abs(unmerged - base_alone)) > 1e-3  # the adapters learnt something

    config, state = hf_molmo.load_hf_checkpoint(out)
    assert config == model_cfg.replace(dtype=config.dtype)
    expected = lora.merged_params(params, lora.dense_shapes(model_cfg), lora_cfg.scale)
    got = nnx.to_pure_dict(state)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_predictor_runs_base_plus_adapters_unmerged_and_int8_weights(lora_runs):
    """predict / evaluate (Predictor.from_checkpoint) on a LoRA run's checkpoint: its base with the
    adapters, unmerged, exactly; weights="int8" / "nf4": every Dense kernel int8 / 4-bit codes, logits
    close to float32's."""
    root, _, workdir = lora_runs
    model = load_orbax_model(str(workdir))
    attention_q = nnx.to_pure_dict(nnx.state(model))["llm"]["blocks"]["attention"]["q"]
    assert set(attention_q) == {"kernel", "bias", lora.ADAPTER}
    base, adapters = saved_state(root / "base", 3), saved_state(workdir, STEPS)["params"]
    model_cfg = trainer.model_config_from(configs.load(str(root / "lora_base.py")))
    lora_cfg = lora.LoraConfig(rank=RANK, alpha=8.0, targets=("llm_attention", "llm_mlp", "connector"))
    params = opt_lib.merge_trees(opt_lib.merge_trees(base["params"], base["frozen"]), adapters)
    batch = random_batch(model_cfg)
    unmerged = compute_logits(lora_model(model_cfg, lora_cfg, params), batch)
    np.testing.assert_array_equal(compute_logits(model, batch), unmerged)

    for weights, dtype, bound in (("int8", np.int8, 0.05), ("nf4", jax.numpy.uint4, 0.5)):
        quantized = with_compute_dtype(model, "float32", weights)
        kernels = [d.kernel[...] for d in lora.dense_layers(quantized).values()]
        assert kernels and all(k.dtype == dtype for k in kernels)
        difference = np.max(np.abs(compute_logits(quantized, batch) - unmerged))
        assert 0 < difference < bound * np.max(np.abs(unmerged)), (weights, difference)


def test_aot_plans_lora_and_qlora_steps_with_less_memory_than_full_fine_tuning():
    """tools/aot --lora / --lora-base-dtype on the demo config for a v5e-8: the adapters-only
    step's arguments (params, frozen base, optimizer state) shrink, more with an int8 base, most
    with nf4."""

    topology = aot.parse_topology("v5e-8")
    exp = configs.load("configs/demo.py:pretrain")
    arguments = {}
    for name, rank, base_dtype in (("full", None, None), ("lora", 8, None), ("qlora", 8, "int8"),
                                   ("qlora_nf4", 8, "nf4")):
        report, = aot.compile_report(aot.prepare_config(exp, lora_rank=rank, lora_base_dtype=base_dtype), topology)
        assert report.fits
        arguments[name] = report.argument_bytes
    assert arguments["qlora_nf4"] < arguments["qlora"] < arguments["lora"] < arguments["full"], arguments
