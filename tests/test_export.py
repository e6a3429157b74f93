"""Export / import of trainer checkpoints: byte-identical round trip of the golden HF weights,
bfloat16 = rounding of float32, the same files from an 8-device and a 1-device checkpoint, an
interrupted export (a killed subprocess) leaves no output folder, the MolmoE layout, and the
real trainer fine-tuning from an import and exporting its own checkpoint. PyTorch loading and
output parity: test_export_torch.py."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from molmo_jax.model import sharding
from molmo_jax.train import hf_interop as export
from molmo_jax.convert.hf_folder import INDEX, read_hf_tensors
from molmo_jax.convert.hf_molmo import hf_to_params, load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from molmo_jax.convert.links import get_path
from molmo_jax.train import trainer
from molmo_jax.model.config import TINY_MOE, TINY_QWEN2, MolmoConfig
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import Checkpointer
from test_checkpointing import Iterator as CheckpointedIterator  # the grain iterator state interface

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 1_000_000  # several shards for the ~4 MB golden models


def train_config(model_config):
    c = common.base_config("sft")
    c.model = common.model_config(model_config)
    return c


@pytest.fixture(scope="module")
def tokenizer_dir(golden_dir):
    return os.path.join(golden_dir, "molmo-7b-d-hf")


@pytest.fixture(scope="module", params=["qwen2_style", "olmo_style"])
def imported(request, golden_dir, tmp_path_factory):
    """(golden HF folder, trainer checkpoint imported from it)."""
    hf = os.path.join(golden_dir, "model", request.param)
    ckpt = str(tmp_path_factory.mktemp(request.param) / "ckpt")
    export.import_hf(hf, ckpt, train_config(read_hf_config(hf)))
    return hf, ckpt


@pytest.fixture(scope="module")
def qwen2_checkpoint(golden_dir, tmp_path_factory):
    hf = os.path.join(golden_dir, "model", "qwen2_style")
    ckpt = str(tmp_path_factory.mktemp("qwen2") / "ckpt")
    export.import_hf(hf, ckpt, train_config(read_hf_config(hf)))
    return hf, ckpt


def test_import_writes_the_trainer_layout(imported):
    """What the trainer's init.checkpoint does: restore the whole state onto abstract targets."""
    hf, ckpt = imported
    config = read_hf_config(hf)
    expected = hf_to_params(read_hf_tensors(hf), config)
    optimizer = common.base_config("sft").optimizer
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda p: export.training_state(p, optimizer, 10, 0), expected)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    step, state, meta = Checkpointer(ckpt).restore_latest(abstract, None)
    assert step == 0 and MolmoConfig.from_dict(meta["model"]) == config
    assert "embedding" in state["frozen"]["llm"]["embed"]  # frozen by the recipe
    np.testing.assert_array_equal(state["frozen"]["llm"]["embed"]["embedding"], expected["llm"]["embed"]["embedding"])
    np.testing.assert_array_equal(state["params"]["llm"]["lm_head"]["kernel"], expected["llm"]["lm_head"]["kernel"])


def test_round_trip_is_byte_identical(imported, tokenizer_dir, tmp_path):
    """golden HF -> orbax -> HF: same keys and bytes; HF -> orbax -> HF again: same files."""
    hf, ckpt = imported
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, tokenizer=tokenizer_dir, max_shard_bytes=SHARD)
    golden, ours = read_hf_tensors(hf), read_hf_tensors(out)
    assert sorted(golden) == sorted(ours)
    for key in golden:
        assert ours[key].dtype == np.float32 and ours[key].shape == golden[key].shape, key
        assert ours[key].tobytes() == golden[key].tobytes(), key
    index = json.load(open(os.path.join(out, INDEX)))
    assert index["metadata"] == {"total_size": 4 * sum(t.size for t in golden.values()),
                                 "total_parameters": sum(t.size for t in golden.values())}
    assert len(set(index["weight_map"].values())) > 1
    assert read_hf_config(out) == read_hf_config(hf)
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= set(os.listdir(out))

    again_ckpt, again = str(tmp_path / "ckpt2"), str(tmp_path / "hf2")
    export.import_hf(out, again_ckpt, train_config(read_hf_config(out)))
    export.export_checkpoint(again_ckpt, again, tokenizer=tokenizer_dir, max_shard_bytes=SHARD)
    files = sorted(os.listdir(out))
    assert files == sorted(os.listdir(again))
    _, mismatch, errors = filecmp.cmpfiles(out, again, files, shallow=False)
    assert not mismatch and not errors


def test_bfloat16_is_the_rounding_of_float32(qwen2_checkpoint, tokenizer_dir, tmp_path):
    hf, ckpt = qwen2_checkpoint
    out = str(tmp_path / "bf16")
    export.export_checkpoint(ckpt, out, tokenizer=tokenizer_dir, dtype="bfloat16", max_shard_bytes=SHARD)
    golden, ours = read_hf_tensors(hf), read_hf_tensors(out)
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    for key, value in golden.items():
        assert ours[key].dtype == ml_dtypes.bfloat16, key
        assert ours[key].tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), key


def subtree_like(full, part):
    return {k: subtree_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in part.items()}


def save_tiny_checkpoint(directory, devices, config=TINY_QWEN2):
    """A tiny Molmo training state (random weights), sharded by the logical rules over `devices`."""
    mesh = sharding.make_mesh({"fsdp": len(devices)}, devices)
    abstract = nnx.state(nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = nnx.to_pure_dict(sharding.named_shardings(sharding.state_specs(abstract, mesh), mesh))
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(abstract))
    state = export.training_state(params, common.base_config("sft").optimizer, 10, 0)
    replicated = NamedSharding(mesh, P())
    targets = {k: (subtree_like(shardings, v) if k in ("params", "frozen") else jax.tree.map(lambda _: replicated, v))
               for k, v in state.items()}
    state = jax.device_put(state, targets)
    ck = Checkpointer(directory, async_save=False)
    ck.save(3, state, None, {"step": 3, "model": config.to_dict(), "mesh": dict(mesh.shape)})
    ck.close()
    return state


def test_moe_model_round_trips_through_the_molmoe_layout(tokenizer_dir, tmp_path):
    """A MolmoE-style checkpoint (run workdir given) -> HF folder -> our reader: same parameters."""
    state = save_tiny_checkpoint(str(tmp_path / "run" / "checkpoints"), jax.devices()[:1], TINY_MOE)
    export.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"), tokenizer=tokenizer_dir)
    config, params = load_hf_checkpoint(str(tmp_path / "hf"))
    assert config.llm == TINY_MOE.llm
    got = nnx.to_pure_dict(params)
    leaves = [leaf for part in ("params", "frozen") for leaf in jax.tree_util.tree_flatten_with_path(state[part])[0]]
    assert len(leaves) == len(jax.tree.leaves(got))
    for path, value in leaves:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(get_path(got, tuple(k.key for k in path))),
                                      err_msg=str(path))


def test_export_from_8_devices_equals_export_from_1(tokenizer_dir, tmp_path):
    assert len(jax.devices()) == 8
    state = save_tiny_checkpoint(str(tmp_path / "ck8"), jax.devices())
    assert len(state["params"]["llm"]["lm_head"]["kernel"].sharding.device_set) == 8
    save_tiny_checkpoint(str(tmp_path / "ck1"), jax.devices()[:1])
    for name in ("ck8", "ck1"):
        export.export_checkpoint(str(tmp_path / name), str(tmp_path / f"out_{name}"), tokenizer=tokenizer_dir,
                                 max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "out_ck8"))
    assert files == sorted(os.listdir(tmp_path / "out_ck1")) and len(files) > 10
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "out_ck8", tmp_path / "out_ck1", files, shallow=False)
    assert not mismatch and not errors


PAUSED_EXPORT = """
import functools, sys, time
import molmo_jax.export as cli
flag = sys.argv[1]
def pause(name):
    open(flag, "w").write(name)
    time.sleep(300)
cli.export_checkpoint = functools.partial(cli.export_checkpoint, on_shard_done=pause)
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_export_leaves_no_output(qwen2_checkpoint, tokenizer_dir, tmp_path, sig):
    """The export CLI in a subprocess, paused after its first shard, then killed."""
    _, ckpt = qwen2_checkpoint
    out, flag = tmp_path / "out", tmp_path / "first_shard_written"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, str(flag), "--checkpoint", ckpt, "--out", str(out),
                             "--tokenizer", tokenizer_dir, "--shard-size", "1MB"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "the export never finished its first shard"
        time.sleep(0.2)
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    assert len(partial) == 1 and "model-00001-of-" in " ".join(os.listdir(tmp_path / partial[0]))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    left = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    if sig == signal.SIGTERM:  # unwinds and removes its temporary folder
        assert left == []
    else:  # nothing can run on SIGKILL: the next export removes the leftover
        assert left == partial
    export.export_checkpoint(ckpt, str(out), tokenizer=tokenizer_dir, max_shard_bytes=SHARD)
    assert os.path.exists(out / INDEX) and [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_bad_inputs_are_named(qwen2_checkpoint, tokenizer_dir, tmp_path):
    hf, ckpt = qwen2_checkpoint
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(export.ExportError, match="not empty; pass --force"):
        export.export_checkpoint(ckpt, str(tmp_path / "full"), tokenizer=tokenizer_dir)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(export.ExportError, match=r"--step 7: .* steps \[0\]"):
        export.export_checkpoint(ckpt, str(tmp_path / "o"), step=7, tokenizer=tokenizer_dir)
    with pytest.raises(export.ExportError, match="does not record its tokenizer; pass --tokenizer"):
        export.export_checkpoint(ckpt, str(tmp_path / "o"))
    with pytest.raises(export.ExportError, match="no finished checkpoint"):
        export.export_checkpoint(str(tmp_path / "full"), str(tmp_path / "o"), tokenizer=tokenizer_dir)
    with pytest.raises(export.ExportError, match="--shard-size '5XB'"):
        export.parse_size("5XB")
    assert export.parse_size("5GB") == 5 * 10 ** 9 and export.parse_size("2MiB") == 2 * 2 ** 20
    with pytest.raises(export.ExportError, match=r"--config model does not fit .*qwen2_style: parameter \S+ is "
                                                 r"(None|\(.*\)) in the config, (None|\(.*\)) in the checkpoint"):
        export.import_hf(hf, str(tmp_path / "o"), train_config(TINY_QWEN2))
    export.export_checkpoint(ckpt, str(tmp_path / "full"), tokenizer=tokenizer_dir, force=True)
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / INDEX).exists()
    assert sorted(os.listdir(tmp_path)) == ["full"]  # nothing replaced or partial left beside it
    assert not os.path.exists(tmp_path / "o")


class TextBatches(CheckpointedIterator):
    """Text-only training batches with the grain iterator interface the checkpointer saves."""

    def __init__(self, vocab, batch=2, length=16):
        super().__init__()
        self.rng, self.shape, self.vocab = np.random.default_rng(0), (batch, length), vocab

    def __next__(self):
        self.position += 1
        ids = self.rng.integers(0, self.vocab, self.shape).astype(np.int32)
        return {"input_ids": ids, "target_tokens": np.roll(ids, -1, axis=1),
                "loss_masks": np.ones(self.shape, np.float32)}


def test_trainer_fine_tunes_from_an_import_and_its_checkpoint_exports(tokenizer_dir, tmp_path):
    """HF folder -> import_hf -> 2 training steps with config.init.checkpoint -> export of the
    trainer's own checkpoint: the frozen embedding is the imported one, the trained LM head
    the trainer's."""
    config = TINY_QWEN2
    cfg = train_config(config)  # the release recipe: the base token embedding is frozen
    cfg.train.total_steps, cfg.train.global_batch, cfg.data.seq_len, cfg.data.max_crops = 2, 2, 16, 1
    cfg.checkpoint.every, cfg.log.tensorboard, cfg.sharding.max_replicated_fraction = 2, False, 1.0
    hf_params = nnx.to_pure_dict(nnx.state(Molmo(config, rngs=nnx.Rngs(7)), nnx.Param))
    save_hf_checkpoint(str(tmp_path / "hf"), hf_params, config)
    export.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), cfg)

    cfg.init.checkpoint = str(tmp_path / "imported")
    history = trainer.train(cfg, str(tmp_path / "run"), data_iterator=TextBatches(config.llm.vocab_size),
                            devices=jax.devices()[:1])
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)

    export.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), tokenizer=tokenizer_dir)
    _, exported = load_hf_checkpoint(str(tmp_path / "out"))
    exported = nnx.to_pure_dict(exported)
    state_dir = tmp_path / "run" / "checkpoints" / "2" / "state"
    meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.tree)
    trained = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore))
    np.testing.assert_array_equal(exported["llm"]["embed"]["embedding"], hf_params["llm"]["embed"]["embedding"])
    np.testing.assert_array_equal(exported["llm"]["lm_head"]["kernel"], trained["params"]["llm"]["lm_head"]["kernel"])
    assert not np.array_equal(exported["llm"]["lm_head"]["kernel"], hf_params["llm"]["lm_head"]["kernel"])


def test_a_checkpoint_without_model_family_is_read_as_the_family_its_model_dict_shows():
    """Molmo2 checkpoints written before the trainer recorded "model_family" export as Molmo2;
    Molmo's (which never had it) stay Molmo's; a named family that does not exist is an error."""
    from molmo_jax.model import molmo2_config as m2
    from molmo_jax.model.config import TINY_QWEN2, MolmoConfig
    assert export.recorded_config({"model": m2.TINY_MOLMO2_QWEN3.to_dict()}, "meta") == m2.TINY_MOLMO2_QWEN3
    assert isinstance(export.recorded_config({"model": TINY_QWEN2.to_dict()}, "meta"), MolmoConfig)
    assert export.recorded_config({"model_family": "molmo2", "model": m2.TINY_MOLMO2_OLMO3.to_dict()},
                                  "meta") == m2.TINY_MOLMO2_OLMO3
    with pytest.raises(export.ExportError, match="model_family 'molmo3'"):
        export.recorded_config({"model_family": "molmo3", "model": TINY_QWEN2.to_dict()}, "meta")
