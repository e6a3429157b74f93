"""Molmo2 in the trainer: the tiny Molmo2 trained in-process on rows built from synthetic
moving-shape videos through the real Molmo2 processor (data_pipelines.molmo2_pipeline), with
its loss falling; a Molmo2 train state saved and restored bit for bit, its config read back
equal from the checkpoint; a preempted run resumed where it stopped, repeating the
uninterrupted losses and parameters; a checkpoint of another Molmo2 config refused naming
the field. The training layout
(a fixed budget per row) computes the logits of transformers' layout (every crop of the batch
in one array)."""
import json
import os
import signal

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from configs import molmo2_common, molmo2_tiny
from data_pipelines import molmo2_processor
from data_pipelines.tokenizer import load_tokenizer
from molmo_jax.model import molmo2_config as m2, sharding
from molmo_jax.model.molmo2 import Molmo2
from molmo_jax.train import families, optimizer as opt_lib, trainer
from molmo_jax.train.checkpointing import Checkpointer, CheckpointMismatchError
from molmo_jax.train.config_checks import ConfigError, validate
import molmo2_rows
from test_molmo2_predict import PROCESSOR, write_tokenizer

STEPS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer with Molmo2's tokens and the tiny processor (24 px crops of 4 px patches)."""
    root = tmp_path_factory.mktemp("molmo2_tok")
    write_tokenizer(root)
    (root / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return root


def tiny_config(folder, videos):
    """configs/molmo2_tiny.py on this test's tokenizer / processor folder and video folder."""
    c = molmo2_tiny.get_config("qwen3")
    c.data.tokenizer = c.data.processor = str(folder)
    c.data.synthetic_options.video_shapes.out_dir = str(videos)
    c.checkpoint.keep, c.checkpoint.async_save = 5, False
    return c


class PreemptedAt(grain.DatasetIterator):
    """The trainer's own pipeline for `config`, sending this process SIGTERM (a preemption) as
    batch `n` is read: the trainer saves that step and stops."""

    def __init__(self, config, n):
        super().__init__(iter(families.family_of(config).make_pipeline(config)))
        self.n, self.read = n, 0

    def __next__(self):
        batch = next(self._parent)
        self.read += 1
        if self.read == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def one_device_setup(config):
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    return trainer.build_train_setup(config, trainer.model_config_from(config), mesh)


def latest(workdir, config):
    """(step, state, meta) of a run's latest checkpoint, restored on one device."""
    ckpt = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        return ckpt.restore_latest(one_device_setup(config).abstract_state, None, partial=True)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("molmo2_run")
    config = tiny_config(folder, root / "videos")
    history = trainer.train(config, str(root / "work"), devices=jax.devices()[:1])
    return config, root, history


def test_a_few_steps_on_synthetic_videos_lower_the_loss(uninterrupted):
    _, _, history = uninterrupted
    losses = [h["loss"] for h in history]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    assert all(h["lr.connector"] > 0 for h in history)


def test_checkpoint_round_trip_of_a_molmo2_train_state(folder, tmp_path):
    """Save then restore the step-0 state (params, frozen rows, AdamW state, step, RNG): every
    leaf bit-identical, and the metadata's model config reads back as the same Molmo2Config."""
    config = tiny_config(folder, tmp_path)
    setup = one_device_setup(config)
    state = setup.init(jax.random.key(config.seed))
    model_cfg = trainer.model_config_from(config)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    try:
        ckpt.save(1, state, None, {"step": 1, "model": model_cfg.to_dict()})
        step, restored, meta = ckpt.restore_latest(setup.abstract_state, None, model_config=model_cfg.to_dict())
    finally:
        ckpt.close()
    assert step == 1 and m2.Molmo2Config.from_dict(meta["model"]) == model_cfg
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_preempted_run_resumes_where_it_stopped(uninterrupted, tmp_path):
    """SIGTERM while step 3 reads its batch: step 3 is saved, the run stops; the next run
    resumes from it (params, optimizer, data position) and repeats the uninterrupted steps 4-6.
    Within 1e-5, not bit for bit: each train() call here compiles its own step, and two XLA:CPU
    compilations of it differed in the 6th digit (test_trainer.py gets bit-exact resumes from
    subprocesses sharing one compilation cache)."""
    config, root, history = uninterrupted
    work = tmp_path / "work"
    stopped = trainer.train(config, str(work), data_iterator=PreemptedAt(config, 3), devices=jax.devices()[:1])
    assert len(stopped) == 3 and sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    np.testing.assert_allclose([h["loss"] for h in stopped], [h["loss"] for h in history[:3]], rtol=1e-5)
    resumed = trainer.train(config, str(work), devices=jax.devices()[:1])
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in history[3:]], rtol=1e-5)
    step_a, state_a, meta_a = latest(root / "work", config)
    step_b, state_b, _ = latest(work, config)
    assert step_a == step_b == STEPS
    for a, b in zip(jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # The checkpoint records the Molmo2 config and the row layout, and they read back equal.
    assert m2.Molmo2Config.from_dict(meta_a["model"]) == trainer.model_config_from(config)
    assert meta_a["row_budget"] == {"seq_len": 128, "crops": 4, "pooled_tokens": 16, "slots": 9}
    # The frozen base token rows are untouched by training.
    fresh = one_device_setup(config).init(jax.random.key(config.seed))
    np.testing.assert_array_equal(np.asarray(state_a["frozen"]["llm"]["embed"]["embedding"]),
                                  np.asarray(fresh["frozen"]["llm"]["embed"]["embedding"]))


def test_checkpoint_of_another_molmo2_config_is_refused_naming_the_field(uninterrupted):
    config, root, _ = uninterrupted
    other = config.copy_and_resolve_references()
    other.model.adapter.projector_hidden = 40
    other.train.total_steps = STEPS + 1
    with pytest.raises(CheckpointMismatchError, match="adapter.projector_hidden"):
        trainer.train(other, str(root / "work"), devices=jax.devices()[:1])


def test_optimizer_groups_cover_the_molmo2_parameters():
    model = nnx.eval_shape(lambda: Molmo2(m2.TINY_MOLMO2_QWEN3, rngs=nnx.Rngs(0)))
    labels = opt_lib.param_labels(nnx.to_pure_dict(nnx.state(model)), molmo2_common.PARAM_GROUPS)
    assert labels["adapter"]["projector"]["up"]["kernel"] == "connector"
    assert labels["llm"]["embed"]["new_embedding"] == "connector"
    assert labels["vision"]["patch_embedding"]["kernel"] == "vit"
    assert labels["llm"]["lm_head"]["kernel"] == "llm"


def test_row_layout_gives_the_logits_of_the_transformers_layout(folder):
    """Two rows with different crop counts (2 and 3 crops, padded to 4) through embed_rows
    equal the same examples with every crop of the batch in one array."""
    tok = load_tokenizer(folder, pad_to=500)
    proc = molmo2_processor.load_config(folder)
    rng = np.random.default_rng(0)
    budget = molmo2_rows.RowBudget(seq_len=96, max_crops=4, max_pooled_tokens=40)
    rows, flat = [], []
    for hw in ((20, 20), (30, 50)):
        inputs = molmo2_processor.process("What is it?", tok, proc, images=[rng.integers(0, 256, (*hw, 3), np.uint8)])
        rows.append(molmo2_rows.training_row(inputs, tok.encode(" A cat."), tok.eos_id, budget, (36, 48)))
        flat.append(inputs)
    assert [int(np.sum(~np.all(r["pixel_values"] == -1, axis=(1, 2)))) for r in rows] == [2, 3]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = Molmo2(m2.TINY_MOLMO2_QWEN3, rngs=nnx.Rngs(1))
    ids, valid = np.maximum(batch["input_ids"], 0), batch["input_ids"] != -1
    ours = model(ids, batch["pixel_values"], batch["token_pooling"], attention_mask=valid,
                 position_ids=np.maximum(batch["position_ids"], 0), mm_token_type_ids=batch["mm_token_type_ids"])
    offsets = np.cumsum([0] + [f["pixel_values"].shape[0] * 36 for f in flat])[:-1]
    pooling = np.concatenate([np.where(f["image_token_pooling"] >= 0, f["image_token_pooling"] + o, -1)
                              for f, o in zip(flat, offsets)])
    theirs = model(ids, np.concatenate([f["pixel_values"] for f in flat]), pooling, attention_mask=valid,
                   position_ids=np.maximum(batch["position_ids"], 0), mm_token_type_ids=batch["mm_token_type_ids"])
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], atol=1e-5)


def test_training_row_targets_and_padding(folder):
    tok = load_tokenizer(folder, pad_to=500)
    inputs = molmo2_processor.process("Hi", tok, molmo2_processor.load_config(folder),
                                      images=[np.zeros((24, 24, 3), np.uint8)])
    answer = tok.encode(" ok")
    row = molmo2_rows.training_row(inputs, answer, tok.eos_id, molmo2_rows.RowBudget(64, 2, 20), (36, 48))
    n = inputs["input_ids"].shape[1] + len(answer) + 1
    ids = row["input_ids"]
    assert np.all(ids[n:] == -1) and np.all(row["target_tokens"][:n - 1] == ids[1:n])
    weighted = row["target_tokens"][row["loss_masks"] > 0]
    assert weighted.tolist() == answer + [tok.eos_id]
    assert np.all(row["loss_masks"][n:] == -1) and row["position_ids"][n - 1] == n - 1
    assert row["token_pooling"].shape == (20, 9) and np.all(row["token_pooling"][:, 4:] == -1)


@pytest.mark.parametrize("budget, message", [
    (molmo2_rows.RowBudget(8, 2, 20), "tokens > seq_len 8"),
    (molmo2_rows.RowBudget(64, 0, 20), "crops/frames > max_crops 0"),
    (molmo2_rows.RowBudget(64, 2, 3), "pooled tokens > max_pooled_tokens 3"),
])
def test_an_example_over_the_row_budget_is_one_error_naming_it(folder, budget, message):
    tok = load_tokenizer(folder, pad_to=500)
    inputs = molmo2_processor.process("Hi", tok, molmo2_processor.load_config(folder),
                                      images=[np.zeros((24, 24, 3), np.uint8)])
    with pytest.raises(molmo2_rows.ExampleTooLong, match=message):
        molmo2_rows.training_row(inputs, [1], tok.eos_id, budget, (36, 48))


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "model_family", "molmo3"), "config.model_family='molmo3': choose one of molmo, molmo2"),
    (lambda c: setattr(c.data, "row_crops", 0), "config.data.row_crops=0"),
    (lambda c: c.lora.update(dict(rank=8, targets=("connector/.*",))),
     r"config.lora.targets: target 'connector/\.\*' matches no layer of this model"),
    (lambda c: setattr(c.init, "llm", "/some/qwen3"), "a Molmo2 run starts from config.init.checkpoint"),
    (lambda c: setattr(c.model.adapter, "widht", 3), "unknown config key"),
])
def test_bad_molmo2_configs_are_one_error_line(folder, tmp_path, change, message):
    config = tiny_config(folder, tmp_path)
    validate(config)
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_other_mixtures_are_refused_naming_what_exists(folder, tmp_path):
    config = tiny_config(folder, tmp_path)
    config.data.mixture = "molmo2"
    with pytest.raises(ValueError, match="needs datasets no Molmo2 source serves yet"):
        trainer.train(config, str(tmp_path / "work"), devices=jax.devices()[:1])
