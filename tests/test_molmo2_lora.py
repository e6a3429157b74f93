"""LoRA / QLoRA for Molmo2 (model/lora.py, the mechanism Molmo uses) on the tiny Molmo2, in-process
on one CPU device, on a hand-made training-layout batch (4 rows, one crop each, 4 pooled tokens).

  targets    the presets put adapters on every Dense of the SigLIP2 ViT blocks, the Molmo2 adapter
             (pooling attention and SwiGLU projector) and the Qwen3 decoder (QK-norm attention,
             SwiGLU); only they train, the frozen base is the whole plain model;
  training   a few LoRA steps on a base checkpoint lower the loss, change every adapter and leave
             every base parameter bit-identical; the same with an nf4 (QLoRA) base (int8 / nf4
             inference: test_molmo2_predict.py);
  checkpoint the trainer's adapters-only save (no frozen base) restores bit for bit;
  merged     lora.merged_params gives a plain Molmo2 with the logits of base + adapters.
"""
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Molmo2ForConditionalGeneration

from configs import molmo2_tiny
from molmo_jax.convert import hf_molmo
from molmo_jax.convert.hf_folder import read_hf_tensors
from molmo_jax.convert.links import leaves
from molmo_jax.model import lora, sharding
from molmo_jax.model import molmo2_config as m2
from molmo_jax.model.layers import rescale_to_fan_in
from molmo_jax.model.molmo2 import Molmo2
from molmo_jax.train import hf_interop, molmo2_family, optimizer as opt_lib, trainer
from molmo_jax.train.checkpointing import Checkpointer
from test_lora import lora_model
from test_molmo2_model import CASES, TOL, our_forward, random_hf_model
from test_molmo2_predict import PROCESSOR, write_tokenizer

RANK = 4
TARGETS = ("llm_attention", "llm_mlp", "connector", "vit")
STEPS = 12


def lora_config(base_dtype="float32", base=""):
    """configs/molmo2_tiny.py with LoRA on every target group; a high LR, so a few steps learn."""
    c = molmo2_tiny.get_config("qwen3")
    c.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    c.lora.update(dict(rank=RANK, alpha=8.0, targets=TARGETS, base_dtype=base_dtype))
    c.init.checkpoint = base
    for group in ("vit", "connector", "llm"):
        c.optimizer[group] = dict(lr=1e-2, warmup_steps=1)
    return c


def row_batch(model_cfg, rows=4, length=32):
    """Training-layout rows (molmo2_family.model_kwargs' keys): a 4-token image block (start, 4
    patches, end) after the first token, then an arithmetic token sequence (step 5 mod 16) to
    learn; every crop is random noise, pooled by 2x2 windows of its 6x6 patches."""
    vc, rng = model_cfg.vision, np.random.default_rng(0)
    ids = ((rng.integers(0, 16, (rows, 1)) + 5 * np.arange(length + 1)) % 16 + 100).astype(np.int32)
    ids[:, 1], ids[:, 6] = model_cfg.image_start_token_id, model_cfg.image_end_token_id
    ids[:, 2:6] = model_cfg.image_patch_id
    inputs = ids[:, :-1]
    loss_masks = np.ones((rows, length), np.float32)
    loss_masks[:, :7] = 0  # the image block's targets
    side = vc.grid[1]
    windows = [[r * side + c, r * side + c + 1, (r + 1) * side + c, (r + 1) * side + c + 1]
               for r, c in ((0, 0), (0, 2), (2, 0), (2, 2))]
    return {"input_ids": inputs, "target_tokens": ids[:, 1:], "loss_masks": loss_masks,
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "subsegment_ids": np.zeros((rows, length), np.int32),  # one example, one conversation per row
            "mm_token_type_ids": ((inputs >= model_cfg.image_start_token_id) & (inputs <= model_cfg.image_patch_id)
                                  ).astype(np.int32),
            "pixel_values": rng.normal(size=(rows, 1, vc.num_patches, vc.patch_dim)).astype(np.float32),
            "token_pooling": np.broadcast_to(np.asarray(windows, np.int32), (rows, 4, 4)).copy()}


def one_device_setup(config):
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    return mesh, trainer.build_train_setup(config, trainer.model_config_from(config), mesh)


def write_base(directory, seed=1):
    """A trainer checkpoint (step 3) of the plain tiny Molmo2: the random init of `seed` with its
    kernels rescaled to std 1 / sqrt(fan_in), so that activations (and the gradients of the ViT's
    and adapter's LoRA matrices) are at unit scale, not the vanishing ones of std 0.02."""
    plain = lora_config()
    plain.lora.rank, plain.lora.base_dtype = 0, "float32"
    model_cfg = trainer.model_config_from(plain)
    _, setup = one_device_setup(plain)
    model = Molmo2(model_cfg, rngs=nnx.Rngs(seed))
    rescale_to_fan_in(model)
    params, frozen = opt_lib.split_trainable(nnx.to_pure_dict(nnx.state(model)), plain.optimizer.frozen)
    state = dict(setup.init(jax.random.key(seed)), params=params, frozen=frozen)
    saver = Checkpointer(str(directory), async_save=False)
    saver.save(3, state, None, {"step": 3, "model_family": "molmo2", "model": model_cfg.to_dict()})
    saver.close()
    return str(directory)


@functools.lru_cache(maxsize=None)
def _run(base_dtype, base):
    """(config, setup, initial state, final state, lora meta, losses) of STEPS LoRA updates."""
    config = lora_config(base_dtype, base)
    mesh, setup = one_device_setup(config)
    state, meta = trainer.lora_initial_state(config, trainer.model_config_from(config), setup)
    batch = sharding.make_global_batch(row_batch(trainer.model_config_from(config)), mesh)
    initial, losses = jax.device_get(state), []
    for _ in range(STEPS):
        state, metrics = setup.step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return config, setup, initial, jax.device_get(state), meta, losses


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("molmo2_base") / "checkpoints")


def trained(base_dtype, base=""):
    return _run(base_dtype, base)


@pytest.fixture(scope="module")
def lora_checkpoint(base, tmp_path_factory):
    """The float32 run's final state saved as the trainer saves a LoRA run's (saved_part + meta),
    with a tokenizer and processor folder (the tiny processor of test_molmo2_predict.py)."""
    config, _, _, final, meta, _ = trained("float32", base)
    root = tmp_path_factory.mktemp("molmo2_lora")
    write_tokenizer(root)
    (root / "processor_config.json").write_text(json.dumps(PROCESSOR))
    config = config.copy_and_resolve_references()  # the cached run's stays as it was
    config.data.tokenizer = config.data.processor = str(root)
    saver = Checkpointer(str(root / "checkpoints"), async_save=False)
    saver.save(STEPS, jax.tree.map(jax.numpy.asarray, trainer.saved_part(final, trainer.lora_config_from(config))),
               None, {"step": STEPS, "model_family": "molmo2", "model": trainer.model_config_from(config).to_dict(),
                      "tokenizer": str(root), **molmo2_family.data_meta(config), "lora": meta})
    saver.close()
    return str(root / "checkpoints")


def paths_of(tree):
    return sorted("/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def test_presets_adapt_every_dense_of_vit_adapter_and_decoder_and_only_adapters_train():
    config = lora_config()
    model_cfg = trainer.model_config_from(config)
    shapes = lora.dense_shapes(model_cfg)
    adapted = lora.target_paths(list(shapes), TARGETS)
    # Every Dense but the logits head and the patch embedding (outside every target group).
    assert adapted == sorted(set(shapes) - {"llm/lm_head", "vision/patch_embedding"})
    assert {"llm/blocks/attention/q", "llm/blocks/ffn/mlp/gate", "adapter/pooling/wq", "adapter/projector/down",
            "vision/blocks/attention/wo", "vision/blocks/w1"} <= set(adapted)
    _, setup = one_device_setup(config)
    state = setup.abstract_state
    assert paths_of(state["params"]) == sorted(f"{p}/adapter/{x}" for p in adapted for x in "ab")
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if x.ndim)  # noqa: E731
    plain = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)))))
    assert paths_of(state["frozen"]) == paths_of(plain)
    # rank * (fan_in + fan_out) per adapted kernel [*layers, *in, *out], per stacked layer.
    expected = 0
    for path in adapted:
        shape, (n_in, n_out) = lora._get(plain, path)["kernel"].shape, shapes[path]
        lead = len(shape) - n_in - n_out
        expected += int(np.prod(shape[:lead])) * RANK * (int(np.prod(shape[lead:lead + n_in]))
                                                         + int(np.prod(shape[lead + n_in:])))
    assert size(state["params"]) == expected
    assert size(state["opt_state"]) == 2 * expected  # Adam's moments, of the adapters alone


@pytest.mark.parametrize("base_dtype", ["float32", "nf4"])
def test_lora_steps_lower_the_loss_and_leave_the_base_bit_identical(base, base_dtype):
    """float32 base, and QLoRA's: every Dense kernel of the frozen base as nf4 codes."""
    _, _, initial, final, meta, losses = trained(base_dtype, base)
    assert meta["base"] == base and meta["base_step"] == 3 and meta["base_dtype"] == base_dtype
    q = final["frozen"]["llm"]["blocks"]["attention"]["q"]
    assert q["kernel"].dtype == (jax.numpy.uint4 if base_dtype == "nf4" else np.float32)
    assert ("kernel_scale" in q) == (base_dtype == "nf4")
    assert losses[-1] < losses[0] - 0.5 and all(b < a for a, b in zip(losses, losses[1:])), losses
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(initial["frozen"])[0],
                            jax.tree.leaves(final["frozen"])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    changed = {p: not np.array_equal(a, b) for p, a, b in zip(
        paths_of(initial["params"]), jax.tree.leaves(initial["params"]), jax.tree.leaves(final["params"]))}
    assert all(changed.values()), [p for p, c in changed.items() if not c]


def test_the_adapters_only_checkpoint_restores_bit_for_bit(base, lora_checkpoint):
    config, setup, _, final, meta, _ = trained("float32", base)
    lora_cfg, model_cfg = trainer.lora_config_from(config), trainer.model_config_from(config)
    reader = Checkpointer(lora_checkpoint, read_only=True)
    try:
        step, restored, saved_meta = reader.restore_latest(trainer.saved_part(setup.abstract_state, lora_cfg), None,
                                                           model_config=model_cfg.to_dict())
    finally:
        reader.close()
    assert step == STEPS and "frozen" not in restored and saved_meta["lora"] == meta
    assert paths_of(restored["params"]) == paths_of(final["params"])
    for key in ("params", "opt_state", "step", "rng"):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final[key])[0], jax.tree.leaves(restored[key])):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=key + jax.tree_util.keystr(path))


def logits_of(model, model_cfg):
    batch = row_batch(model_cfg)
    return np.asarray(model(**molmo2_family.model_kwargs(jax.tree.map(jax.numpy.asarray, batch))))


def test_merged_weights_give_the_logits_of_base_plus_adapters(base):
    config, _, _, final, _, _ = trained("float32", base)
    lora_cfg, model_cfg = trainer.lora_config_from(config), trainer.model_config_from(config)
    params = opt_lib.merge_trees(final["params"], final["frozen"])
    unmerged = logits_of(lora_model(model_cfg, lora_cfg, params), model_cfg)
    merged = lora.merged_params(params, lora.dense_shapes(model_cfg), lora_cfg.scale)
    plain = lora_model(model_cfg, lora.LoraConfig(), merged)  # rank 0: the plain Molmo2
    assert not any(d.adapter is not None for d in lora.dense_layers(plain).values())
    assert np.max(np.abs(logits_of(plain, model_cfg) - unmerged)) < 1e-5
    base_alone = logits_of(lora_model(model_cfg, lora.LoraConfig(), final["frozen"]), model_cfg)
    assert np.max(np.abs(unmerged - base_alone)) > 1e-2  # the adapters learnt something


def test_merged_export_loads_in_transformers_with_the_logits_of_base_plus_adapters(base, lora_checkpoint, tmp_path):
    """export --merge-lora of the Molmo2 LoRA checkpoint: a folder transformers' Molmo2 loads with no
    missing or unexpected keys, whose logits (float32, a multi-image input in transformers' layout)
    are those of our unmerged base + adapters; our reader reads the merged parameters back."""
    config, _, _, final, _, _ = trained("float32", base)
    lora_cfg, model_cfg = trainer.lora_config_from(config), trainer.model_config_from(config)
    out = hf_interop.export_checkpoint(lora_checkpoint, str(tmp_path / "merged"), merge_lora=True)
    names = os.listdir(out)
    assert {"config.json", "tokenizer.json", "processor_config.json"} <= set(names), names
    assert any(n.endswith(".safetensors") for n in names), names
    hf, info = Molmo2ForConditionalGeneration.from_pretrained(out, output_loading_info=True,
                                                              attn_implementation="eager")
    assert {k: v for k, v in info.items() if v} == {}
    inputs = CASES["multi_image"](model_cfg)
    with torch.no_grad():
        theirs = hf.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    params = opt_lib.merge_trees(final["params"], final["frozen"])
    ours = our_forward(lora_model(model_cfg, lora_cfg, params), inputs)[0]
    mask = inputs["attention_mask"].astype(bool)
    assert np.max(np.abs(theirs[mask] - ours[mask])) < TOL
    base_alone = our_forward(lora_model(model_cfg, lora.LoraConfig(), final["frozen"]), inputs)[0]
    assert np.max(np.abs(ours[mask] - base_alone[mask])) > 100 * TOL  # the comparison sees the adapters
    read_config, state = hf_molmo.load_hf_checkpoint(out)
    assert read_config == model_cfg
    expected = lora.merged_params(params, lora.dense_shapes(model_cfg), lora_cfg.scale)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0],
                            jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_import_hf_of_a_molmo2_folder_gives_a_base_checkpoint(tmp_path):
    """import_hf with a Molmo2 experiment config: a step-0 checkpoint that records the family and
    holds the folder's parameters exactly (the base a Molmo2 LoRA run names in config.init.checkpoint)."""
    model_cfg = m2.TINY_MOLMO2_QWEN3
    random_hf_model(model_cfg, seed=3).save_pretrained(tmp_path / "hf")
    config = lora_config()
    out = hf_interop.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), config)
    params = hf_interop.CheckpointParams(out)
    try:
        assert params.meta["model_family"] == "molmo2" and params.meta["row_budget"]["crops"] == 4
        assert params.config == model_cfg
        got = params.read([path for path, _ in leaves(params.abstract)])
    finally:
        params.close()
    expected = dict(leaves(hf_molmo.hf_to_params(read_hf_tensors(str(tmp_path / "hf")), model_cfg)))
    assert set(got) == set(expected)
    for path, value in got.items():
        np.testing.assert_array_equal(value, np.asarray(expected[path]), err_msg="/".join(path))
