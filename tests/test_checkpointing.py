"""Checkpointer on the real tiny Molmo training state: save on a 2x4 mesh, restore on 8x1;
keep-N plus keep-every-K; an unreadable latest checkpoint falls back to the previous one and
says so; an interrupted (temporary) save is ignored and never replaces a finished one."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from molmo_jax.model import sharding
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import Checkpointer


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
