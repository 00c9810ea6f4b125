"""Meshes, logical-axis sharding rules, placement on one or many hosts, and multi-process start-up."""
from dspark_jax.parallel.distributed import initialize_distributed, is_primary, wants_distributed
from dspark_jax.parallel.mesh import MESH_AXES, MeshShape, make_mesh, parse_mesh
from dspark_jax.parallel.placement import (opt_state_shardings, put, put_tree, replicate, shard_batch,
                                           shard_state, shardings_of, to_host)
from dspark_jax.parallel.rules import (DEFAULT_RULES, FSDP_RULES, AxisRules, batch_sharding, logical_spec,
                                       make_rules, replicated, state_shardings)

__all__ = ["AxisRules", "DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "MeshShape", "batch_sharding",
           "initialize_distributed", "is_primary", "logical_spec", "make_mesh", "make_rules", "opt_state_shardings",
           "parse_mesh", "put", "put_tree", "replicate", "replicated", "shard_batch", "shard_state",
           "shardings_of", "state_shardings", "to_host", "wants_distributed"]
