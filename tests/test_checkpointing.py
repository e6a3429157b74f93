"""Checkpointer on the real tiny Molmo training state: save on a 2x4 mesh, restore on 8x1;
keep-N plus keep-every-K; an unreadable latest checkpoint falls back to the previous one and
says so; an interrupted (temporary) save is ignored and never replaces a finished one; a
checkpoint of another model stops the restore with nothing touched; a flipped byte in the
array data or a non-finite state is found; a failing save (disk full, read-only file system,
simulated in-process: the tests run as root, where chmod does not stop writes) is one error."""
import errno
import glob
import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from molmo_jax.model import sharding
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import (Checkpointer, CheckpointMismatchError, CheckpointSaveError,
                                           NonFiniteStateError, state_checksums)


def state_init(mesh, seed=0):
    """(init fn, out shardings): params sharded by the logical rules + an Adam state + step."""
    abstract = nnx.split(nnx.eval_shape(lambda: Molmo(TINY_QWEN2, rngs=nnx.Rngs(0))))[1]
    shardings = nnx.to_pure_dict(sharding.named_shardings(sharding.state_specs(abstract, mesh), mesh))

    def init():
        params = nnx.to_pure_dict(nnx.state(Molmo(TINY_QWEN2, rngs=nnx.Rngs(seed))))
        return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(seed)}

    rep = NamedSharding(mesh, P())
    return init, {"params": shardings, "opt_state": (optax.ScaleByAdamState(rep, shardings, shardings),
                                                     optax.EmptyState()), "step": rep}


def sharded_state(mesh, seed=0):
    init, shardings = state_init(mesh, seed)
    return jax.jit(init, out_shardings=shardings)()


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Iterator:
    """The grain iterator interface the checkpoint handler uses (bytes state)."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return str(self.position).encode()

    def set_state(self, state):
        self.position = int(state.decode())

    def start_prefetch(self):
        pass


def test_save_on_2x4_restore_on_8x1_is_identical(tmp_path):
    mesh_a = sharding.make_mesh({"data": 2, "fsdp": 4})
    mesh_b = sharding.make_mesh({"fsdp": 8, "tensor": 1})
    state = sharded_state(mesh_a)
    assert state["params"]["llm"]["lm_head"]["kernel"].sharding.spec == P("fsdp", None)
    ck = Checkpointer(str(tmp_path), keep=2)
    ck.save(7, state, Iterator(7), {"step": 7})
    ck.close()
    init_b, shardings_b = state_init(mesh_b)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          jax.eval_shape(init_b), shardings_b)
    step, restored, meta = Checkpointer(str(tmp_path)).restore_latest(target, it := Iterator())
    assert (step, meta, it.position) == (7, {"step": 7}, 7)
    for (path, a), b, t in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(restored),
                               jax.tree.leaves(target)):
        assert b.sharding == t.sharding, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.fixture(scope="module")
def small_state():
    mesh = sharding.make_mesh({"fsdp": 8})
    x = jax.device_put(np.arange(64, dtype=np.float32), NamedSharding(mesh, P("fsdp")))
    return {"w": x, "step": jnp.int32(0)}


def test_keeps_latest_n_and_every_kth(tmp_path, small_state):
    ck = Checkpointer(str(tmp_path), keep=2, keep_every=4)
    for step in range(1, 10):
        ck.save(step, dict(small_state, step=jnp.int32(step)), None, {"step": step})
    ck.close()
    assert sorted(Checkpointer(str(tmp_path)).manager.all_steps()) == [4, 8, 9]


def test_unreadable_latest_falls_back_to_previous_and_names_it(tmp_path, small_state, caplog):
    ck = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ck.save(step, {"w": small_state["w"] + step, "step": jnp.int32(step)}, Iterator(step), {"step": step})
    ck.close()
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    with caplog.at_level(logging.WARNING, logger="molmo_jax"):
        step, restored, _ = Checkpointer(str(tmp_path)).restore_latest(abstract_of(small_state), it := Iterator())
    assert step == 1 and it.position == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64) + 1)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"checkpoint {tmp_path / '2'} could not be read" in warning and "falling back" in warning
    # Set aside, not deleted and not overwritten by the next save of step 2.
    assert (tmp_path / "2.unreadable").is_dir()
    ck = Checkpointer(str(tmp_path), keep=3)
    ck.save(2, {"w": small_state["w"] + 20, "step": jnp.int32(2)}, Iterator(2), {"step": 2})
    ck.close()
    step, restored, _ = Checkpointer(str(tmp_path)).restore_latest(abstract_of(small_state), Iterator())
    assert step == 2 and float(restored["w"][0]) == 20


def test_interrupted_save_is_ignored_and_finished_one_is_never_replaced(tmp_path, small_state):
    ck = Checkpointer(str(tmp_path), keep=3)
    ck.save(3, {"w": small_state["w"] + 3, "step": jnp.int32(3)}, None, {"step": 3})
    ck.close()
    # What a kill during the save of step 4 leaves behind: orbax's temporary directory.
    partial = tmp_path / "4.orbax-checkpoint-tmp"
    partial.mkdir()
    (partial / "state").mkdir()
    ck = Checkpointer(str(tmp_path), keep=3)
    assert ck.latest_step() == 3
    # A second save of a finished step is refused instead of overwriting it.
    assert ck.save(3, {"w": small_state["w"] * 0, "step": jnp.int32(3)}, None, {"step": 3}) is False
    ck.close()
    assert not partial.exists()  # removed by the manager's start-up clean-up
    _, restored, _ = Checkpointer(str(tmp_path)).restore_latest(abstract_of(small_state), None)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64) + 3)


def file_hashes(root):
    """{relative path: sha256} of every file under `root` (folders included by their files)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def flip_bytes(step_dir):
    """Inverts 4 bytes inside the largest ocdbt data file of a checkpoint's state: the file still
    decodes, orbax reads it without complaint, and the values it gives are wrong."""
    data = max(glob.glob(str(step_dir / "state" / "ocdbt.process_*" / "d" / "*")), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[i] ^= 0xFF
    open(data, "wb").write(bytes(raw))


@pytest.mark.parametrize("read_only", [False, True])
def test_checkpoint_of_another_model_stops_naming_field_and_shapes_and_touches_nothing(tmp_path, small_state,
                                                                                       read_only):
    ck = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ck.save(step, small_state, Iterator(step), {"step": step, "model": {"llm": {"mlp_hidden_size": 64}}})
    ck.close()
    before = file_hashes(tmp_path)
    wide = dict(abstract_of(small_state), w=jax.ShapeDtypeStruct((128,), np.float32, sharding=small_state["w"].sharding))
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(str(tmp_path), read_only=read_only).restore_latest(
            wide, it := Iterator(), model_config={"llm": {"mlp_hidden_size": 128}})
    assert str(e.value).count("\n") == 0
    assert "config.model.llm.mlp_hidden_size is 64 in the checkpoint and 128 here" in str(e.value)
    assert "w is float32[64] in the checkpoint and float32[128] in the config" in str(e.value)
    assert it.position == 0 and file_hashes(tmp_path) == before
    # Without a stored model config, the parameter alone is named.
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint .*2 does not fit this run's model: w is "):
        Checkpointer(str(tmp_path)).restore_latest(wide, None)
    assert file_hashes(tmp_path) == before


W = np.random.default_rng(0).normal(size=64 * 256).astype(np.float32)  # data files of some size


def save_larger(directory, step, value, sharding):
    """Saves {"w": W + value, "step"} at `step`; returns its abstract state."""
    ck = Checkpointer(str(directory), keep=5)
    state = {"w": jax.device_put(W + value, sharding), "step": jnp.int32(step)}
    ck.save(step, state, Iterator(step), {"step": step})
    ck.close()
    return abstract_of(state)


def test_flipped_bytes_fail_the_checksums_and_each_set_aside_copy_is_kept(tmp_path, small_state, caplog):
    def save(step, value):
        return save_larger(tmp_path, step, value, small_state["w"].sharding)

    save(1, 1.0)
    abstract = save(2, 2.0)
    for copy in ("2.unreadable", "2.unreadable.2"):
        flip_bytes(tmp_path / "2")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="molmo_jax"):
            step, restored, _ = Checkpointer(str(tmp_path)).restore_latest(abstract, it := Iterator())
        assert step == 1 and it.position == 1
        np.testing.assert_array_equal(np.asarray(restored["w"]), W + 1)
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert (f"checkpoint {tmp_path / '2'} failed verification (1 array(s) differ from their checksums written "
                "at save time, first state/w") in warning, warning
        assert (tmp_path / copy).is_dir()
        save(2, 2.0)  # the run saves step 2 again; the set-aside copy stays
    assert (tmp_path / "2.unreadable").is_dir() and (tmp_path / "2.unreadable.2").is_dir()


def test_checksums_do_not_depend_on_the_mesh_and_see_one_changed_bit(small_state):
    host = np.asarray(small_state["w"])
    on_two = jax.device_put(host, NamedSharding(sharding.make_mesh({"fsdp": 2}, jax.devices()[:2]), P("fsdp")))
    assert state_checksums({"w": on_two})[0] == state_checksums({"w": small_state["w"]})[0]
    for value in (host, host.astype(jnp.bfloat16), host > 30, host.astype(np.int32).reshape(8, 8)):
        assert state_checksums({"w": value})[0] == state_checksums({"w": jnp.asarray(value)})[0]  # numpy = jax
    flipped = host.copy()
    flipped.view(np.uint32)[17] ^= 1 << 9
    assert state_checksums({"w": jnp.asarray(flipped)})[0] != state_checksums({"w": jnp.asarray(host)})[0]


def test_checksums_of_sub_byte_nf4_codes_agree_on_host_and_device_and_see_one_changed_code():
    codes = (np.arange(64) % 16).astype(jnp.uint4).reshape(8, 8)  # an nf4 base's kernel (model/quantization.py)
    assert state_checksums({"w": codes})[0] == state_checksums({"w": jnp.asarray(codes)})[0]
    changed = codes.copy()
    changed[3, 5] = 2
    assert state_checksums({"w": jnp.asarray(changed)})[0] != state_checksums({"w": jnp.asarray(codes)})[0]


def test_non_finite_state_is_neither_saved_nor_restored(tmp_path, small_state, caplog):
    ck = Checkpointer(str(tmp_path), keep=3)
    ck.save(1, small_state, None, {"step": 1})
    bad = dict(small_state, w=small_state["w"].at[3].set(jnp.nan))
    with pytest.raises(NonFiniteStateError, match=r"state of step 2 holds NaN/inf in 1 array\(s\), first w"):
        ck.save(2, bad, None, {"step": 2})
    # A checkpoint written without checksums (as before they existed) holding a NaN.
    ck.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(bad), meta=ocp.args.JsonSave({"step": 3})))
    ck.close()
    with caplog.at_level(logging.WARNING, logger="molmo_jax"):
        step, _, _ = Checkpointer(str(tmp_path)).restore_latest(abstract_of(small_state), None)
    assert step == 1
    assert "failed verification (non-finite values in 1 array(s), first state/w)" in caplog.text


def test_read_only_checkpointer_skips_a_broken_checkpoint_and_changes_nothing(tmp_path, small_state, caplog):
    for step in (1, 2):
        abstract = save_larger(tmp_path, step, step, small_state["w"].sharding)
    flip_bytes(tmp_path / "2")
    (tmp_path / "3.orbax-checkpoint-tmp").mkdir()  # the source run may be saving right now
    before = file_hashes(tmp_path)
    with caplog.at_level(logging.WARNING, logger="molmo_jax"):
        step, _, _ = Checkpointer(str(tmp_path), read_only=True).restore_latest(abstract, None)
    assert step == 1 and "left in place (read-only)" in caplog.text
    assert file_hashes(tmp_path) == before and (tmp_path / "3.orbax-checkpoint-tmp").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.orbax-checkpoint-tmp"]


@pytest.mark.parametrize("failure, method", [(errno.ENOSPC, "write_text"), (errno.EROFS, "mkdir")])
@pytest.mark.parametrize("async_save", [True, False])
def test_failing_save_is_one_error_and_leaves_nothing_a_resume_trusts(tmp_path, small_state, monkeypatch, capfd,
                                                                      failure, method, async_save):
    """Disk full while orbax writes its files (ENOSPC from the Python-side writes; the array
    data goes through tensorstore, out of reach of a monkeypatch), or a read-only file system
    from the first folder it creates (EROFS)."""
    ck = Checkpointer(str(tmp_path), keep=3, async_save=async_save)
    ck.save(1, small_state, None, {"step": 1})
    ck.wait()
    before = file_hashes(tmp_path / "1")

    def fail(self, *args, **kwargs):
        raise OSError(failure, os.strerror(failure), str(self))

    monkeypatch.setattr(type(epath.Path(tmp_path)), method, fail)
    with pytest.raises(CheckpointSaveError) as e:
        ck.save(2, dict(small_state, step=jnp.int32(2)), None, {"step": 2})
        ck.close()
    ck.close()  # after the failure: closes quietly
    monkeypatch.undo()
    message = str(e.value)
    assert message.startswith(f"could not save the checkpoint of step 2 in {tmp_path}: {os.strerror(failure)}")
    assert "\n" not in message and "Traceback" not in capfd.readouterr().err
    assert Checkpointer(str(tmp_path)).latest_step() == 1 and file_hashes(tmp_path / "1") == before
    assert not (tmp_path / "2").exists()
