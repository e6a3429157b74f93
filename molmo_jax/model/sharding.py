"""Device mesh, logical axis rules and global batches.

The mesh always has the four axes ("data", "fsdp", "tensor", "expert"); any of them may have
size 1. Parameters carry logical axis names (nnx metadata `out_sharding`, set by
`nnx.Param(..., sharding_names=(...))`); this module alone maps those names to mesh axes:

  data    pure data parallelism: parameters replicated, batch split.
  fsdp    ZeRO-3: parameters and optimizer state split on their "embed"-like dim, batch split.
  tensor  Megatron tensor parallelism: attention heads, MLP width and vocabulary split.
  expert  MoE experts split; for dense models it acts as one more batch axis.

Rules are resolved in order (MaxText / flax style): a rule applies to a dimension that is still
unassigned when none of its mesh axes is used by another dimension of the same array and the
mesh axes' product divides the dimension. Later rules for the same name are fallbacks.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Axes the batch dimension is split over (everything but tensor parallelism).
BATCH_AXES = ("data", "fsdp", "expert")
# Axes meant to split parameters; "data" replicates them by design.
PARAM_AXES = ("fsdp", "tensor", "expert")

Rules = Sequence[Tuple[str, Tuple[str, ...]]]

LOGICAL_AXIS_RULES: Rules = (
    # Parameters: tensor parallelism first, then FSDP on the model width.
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vit_heads", ("tensor",)),
    ("vit_mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("embed", ("fsdp", "expert")),  # dense models: the expert axis is extra FSDP
    ("embed", ("fsdp",)),
    ("vit_embed", ("fsdp", "expert")),
    ("vit_embed", ("fsdp",)),
    # Fallbacks for arrays without a free or divisible "embed" dimension (biases, norms,
    # narrow ViT/connector matrices): spend FSDP on whatever dimension is left.
    ("mlp", ("fsdp",)),
    ("vit_mlp", ("fsdp",)),
    ("vocab", ("fsdp",)),
    ("heads", ("fsdp",)),
    ("vit_heads", ("fsdp",)),
    ("expert_mlp", ("fsdp",)),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
)


# --------------------------------------------------------------------------- mesh


def initialize_distributed(cfg: Mapping[str, Any]) -> None:
    """Starts multi-process JAX when the config asks for it.

    cfg: the `distributed` part of the experiment config with keys `enabled`,
    `coordinator_address`, `num_processes`, `process_id`. With `enabled` and no address,
    `jax.distributed.initialize()` detects the cluster from the environment (TPU pods, SLURM).
    """
    if not cfg["enabled"]:
        return
    kwargs = {}
    if cfg["coordinator_address"]:
        if cfg["num_processes"] < 1 or cfg["process_id"] < 0:
            raise ValueError("config.distributed: coordinator_address given but num_processes "
                             f"({cfg['num_processes']}) / process_id ({cfg['process_id']}) are not set")
        kwargs = dict(coordinator_address=cfg["coordinator_address"],
                      num_processes=cfg["num_processes"], process_id=cfg["process_id"])
    jax.distributed.initialize(**kwargs)


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict:
    """Fills the one allowed -1 entry and checks the product against the device count."""
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh: unknown axis {unknown}; the axes are {MESH_AXES}")
    sizes = {name: int(mesh_cfg.get(name, 1)) for name in MESH_AXES}
    free = [name for name, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {sizes}: {num_devices} devices are not divisible by the "
                             f"fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{num_devices} are present")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over ("data", "fsdp", "tensor", "expert") with Auto axes (GSPMD style)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Physical-topology-aware layout on TPU/GPU; plain reshape elsewhere.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------- logical axes


def logical_to_spec(names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for an array whose dimensions carry logical `names` (None = unnamed)."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {tuple(names)} do not match the array shape {tuple(shape)}")
    assigned: list = [None] * len(shape)
    used: set = set()
    for logical, axes in rules:
        axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes shard nothing
        if not axes or used.intersection(axes):
            continue
        for dim, name in enumerate(names):
            if name != logical or assigned[dim] is not None:
                continue
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                continue
            assigned[dim] = axes[0] if len(axes) == 1 else axes
            used.update(axes)
            break
    return P(*assigned)


def variable_names(variable: nnx.Variable) -> Optional[Tuple[Optional[str], ...]]:
    """The logical axis names of an nnx variable (None when it has none)."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def state_specs(state: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> nnx.State:
    """Maps an (abstract) nnx State to a State of PartitionSpecs."""
    return jax.tree.map(
        lambda v: v.replace(logical_to_spec(variable_names(v), v.shape, mesh, rules)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """Tree of PartitionSpecs (possibly inside nnx Variables) -> tree of NamedShardings."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def with_logical_constraint(x: jax.Array, names: Sequence[Optional[str]],
                            rules: Rules = LOGICAL_AXIS_RULES) -> jax.Array:
    """Sharding constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


# --------------------------------------------------------------------------- checks


def unsharded_fraction(shapes: Iterable[Tuple[str, Tuple[int, ...], np.dtype, P]], mesh: Mesh
                       ) -> Tuple[float, list]:
    """Share of parameter bytes that is not split over the parameter axes (fsdp, tensor, expert).

    A parameter split k ways of the possible N = fsdp * tensor * expert counts (1 - k/N) of its
    bytes as replicated. Returns (fraction, [(excess bytes, path, spec), ...] largest first).
    """
    n = math.prod(mesh.shape[a] for a in PARAM_AXES)
    total, excess = 0, []
    for path, shape, dtype, spec in shapes:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        axes = [a for entry in spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        k = math.prod(mesh.shape[a] for a in axes if a in PARAM_AXES)
        total += nbytes
        excess.append((nbytes * (1 - k / n), path, spec))
    excess.sort(key=lambda e: -e[0])
    return (sum(e[0] for e in excess) / total if total else 0.0), excess


def check_sharded_enough(state: nnx.State, specs: nnx.State, mesh: Mesh, max_fraction: float) -> float:
    """Raises when more than `max_fraction` of the parameter bytes are replicated."""
    flat_state = dict(nnx.to_flat_state(state))
    rows = [("/".join(map(str, path)), flat_state[path].shape, flat_state[path].dtype, spec_var.get_value())
            for path, spec_var in nnx.to_flat_state(specs)]
    fraction, excess = unsharded_fraction(rows, mesh)
    if fraction > max_fraction:
        worst = "; ".join(f"{path} {spec} ({b / 2**20:.1f} MiB)" for b, path, spec in excess[:5])
        raise ValueError(f"{fraction:.1%} of parameter bytes are replicated on mesh {dict(mesh.shape)} "
                         f"(allowed {max_fraction:.1%}, config.sharding.max_replicated_fraction). "
                         f"Largest: {worst}")
    return fraction


def validate_parallelism(model_cfg: Any, mesh_sizes: Mapping[str, int], global_batch: int,
                         grad_accum_steps: int, process_count: int) -> None:
    """Refuses, before anything compiles, a config that cannot run on this mesh.

    model_cfg: MolmoConfig. Every problem found is listed in the one error.
    """
    problems = []
    tensor, expert = mesh_sizes["tensor"], mesh_sizes["expert"]
    batch_shards = math.prod(mesh_sizes[a] for a in BATCH_AXES)
    if global_batch % grad_accum_steps:
        problems.append(f"global batch {global_batch} is not divisible by grad_accum_steps {grad_accum_steps}")
    else:
        micro = global_batch // grad_accum_steps
        if micro % batch_shards:
            problems.append(f"micro-batch {micro} (= {global_batch} / {grad_accum_steps} accumulation steps) "
                            f"is not divisible by the batch axes data*fsdp*expert = {batch_shards}")
    if global_batch % process_count:
        problems.append(f"global batch {global_batch} is not divisible by the {process_count} processes")
    llm, vit = model_cfg.llm, model_cfg.vision
    for what, n in (("llm.n_heads", llm.n_heads), ("vision.num_heads", vit.num_heads),
                    ("llm.mlp_hidden_size // 2", llm.mlp_hidden_size // 2),
                    ("vision.mlp_dim", vit.mlp_dim)):
        if n % tensor:
            problems.append(f"{what} = {n} is not divisible by the tensor axis {tensor}")
    if llm.block_type == "moe" and llm.moe_num_experts % expert:
        problems.append(f"llm.moe_num_experts = {llm.moe_num_experts} is not divisible by the expert axis {expert}")
    if problems:
        raise ValueError(f"config cannot run on mesh {dict(mesh_sizes)}: " + "; ".join(problems))


# --------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data, fsdp and expert; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Per-process numpy batch (its share of the global batch) -> dict of global jax.Arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
