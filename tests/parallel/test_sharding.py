"""Sharding: mesh flag parsing, the logical-axis rule table, and sharded == single-device results for
speculative decoding and drafter training on 8 simulated CPU devices (in a subprocess, because the device
count is fixed when JAX starts: see tests/sharding_checks.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.eagle3 import Eagle3Drafter
from dspark_jax.models.transformer import Transformer
from dspark_jax.parallel import (DEFAULT_RULES, FSDP_RULES, AxisRules, initialize_distributed, logical_spec,
                                 make_mesh, opt_state_shardings, parse_mesh, shard_state, shardings_of,
                                 state_shardings, wants_distributed)

MESH_2x4 = AbstractMesh((2, 4), ("data", "model"))
MESH_8 = AbstractMesh((8,), ("data",))


# ---- mesh flag ------------------------------------------------------------------------------------

def test_parse_mesh_canonical_order_and_spaces():
    shape = parse_mesh(" model=4 , data=2 ")
    assert shape.axes == (("data", 2), ("model", 4))
    assert shape.num_devices == 8 and str(shape) == "data=2,model=4"
    assert parse_mesh("data=8").axes == (("data", 8),)


@pytest.mark.parametrize("spec,message", [
    ("", "--mesh is empty"),
    ("data", "expected axis=size"),
    ("=2", "expected axis=size"),
    ("pipeline=2", "unknown mesh axis 'pipeline'"),
    ("data=2,data=4", "given twice"),
    ("data=two", "needs an integer size"),
    ("model=0", "size >= 1"),
])
def test_parse_mesh_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec)


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match=r"needs 8 devices but 1 are available"):
        make_mesh("data=2,model=4")
    mesh = make_mesh("data=1")
    assert dict(mesh.shape) == {"data": 1}


# ---- rule table -----------------------------------------------------------------------------------

@pytest.mark.parametrize("names,shape,mesh,rules,expected", [
    (("embed", "heads"), (32, 32), MESH_2x4, DEFAULT_RULES, P(None, "model")),
    (("heads", "embed"), (32, 32), MESH_2x4, DEFAULT_RULES, P("model", None)),
    (("embed", "mlp"), (32, 64), MESH_2x4, FSDP_RULES, P("data", "model")),
    (("vocab", "embed"), (97, 32), MESH_2x4, DEFAULT_RULES, P(None, None)),  # 97 % 4: replicated
    (("batch", None), (6, 16), MESH_2x4, DEFAULT_RULES, P("data", None)),
    (("batch", None), (3, 16), MESH_2x4, DEFAULT_RULES, P(None, None)),  # 3 % 2: replicated
    (("embed", "heads"), (32, 32), MESH_8, DEFAULT_RULES, P(None, None)),  # no model axis
    (("heads", "mlp"), (32, 64), MESH_2x4, DEFAULT_RULES, P("model", None)),  # an axis is used once
    (("batch",), (8,), MESH_2x4, DEFAULT_RULES.replace(batch=("data", "model")), P(("data", "model"))),
    (("batch",), (6,), MESH_2x4, DEFAULT_RULES.replace(batch=("data", "model")), P("data")),  # fewer axes
    ((), (), MESH_2x4, DEFAULT_RULES, P()),
])
def test_logical_spec(names, shape, mesh, rules, expected):
    assert logical_spec(names, shape, mesh, rules) == expected


def test_logical_spec_errors():
    with pytest.raises(ValueError, match="'pipeline' has no sharding rule"):
        logical_spec(("pipeline",), (8,), MESH_2x4, DEFAULT_RULES)
    with pytest.raises(ValueError, match="do not match an array of shape"):
        logical_spec(("embed",), (8, 8), MESH_2x4, DEFAULT_RULES)
    with pytest.raises(ValueError, match="'pipeline' has no sharding rule"):
        DEFAULT_RULES.replace(pipeline=("data",))
    assert isinstance(FSDP_RULES, AxisRules) and FSDP_RULES.mesh_axes("embed") == ("data",)


def _abstract_state(build):
    return nnx.split(nnx.eval_shape(build))[1]


def _flat_specs(state):
    return {"/".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("alg,head", [("dspark", "vanilla"), ("dspark", "gated"), ("dspark", "rnn"),
                                      ("eagle3", "vanilla")])
def test_every_parameter_name_has_a_rule(alg, head):
    """Targets of both families and every drafter kind: all logical names resolve; weights split as intended."""
    for cfg in (tiny_gemma3(), tiny_qwen3(tie=True)):
        specs = _flat_specs(state_shardings(_abstract_state(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), MESH_2x4))
        assert specs["layers/0/self_attn/q_proj"] == P(None, "model")
        assert specs["layers/0/mlp/down_proj"] == P("model", None)
        dc = make_drafter_config(alg, cfg, block_size=4, num_layers=1, markov_rank=8, markov_head_type=head,
                                 draft_vocab_size=48)
        cls = Eagle3Drafter if alg == "eagle3" else DSparkDrafter
        vocab = list(range(0, 96, 2))
        drafter = _abstract_state(lambda: cls(dc, cfg, rngs=nnx.Rngs(0), draft_vocab_ids=vocab))
        specs = _flat_specs(state_shardings(drafter, MESH_2x4, FSDP_RULES))
        assert specs["fc"] == P(None, "data")
        assert specs["draft_to_target"] == P()  # unnamed variables are replicated
        if alg == "dspark":
            assert specs["markov/w2"] == P(None, "model")
            assert specs["confidence/temperatures"] == P() and specs["confidence/biases"] == P()


def test_single_device_mesh_places_state_and_optimizer():
    mesh = make_mesh("data=1")
    state = nnx.split(Transformer(tiny_qwen3(), rngs=nnx.Rngs(0)), nnx.Param)[1]
    placed = shard_state(state, mesh)
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(placed))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    shardings = opt_state_shardings(tx, jax.eval_shape(tx.init, placed), shardings_of(placed), mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(placed)
    assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(state))
    assert jnp.allclose(jax.tree.leaves(placed)[0], jax.tree.leaves(state)[0])


# ---- distributed start-up -------------------------------------------------------------------------

def test_distributed_trigger(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert not wants_distributed(False) and wants_distributed(True)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert wants_distributed(False)


def test_initialize_distributed_error_is_explained(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        initialize_distributed()
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="jax.distributed.initialize failed"):
        initialize_distributed()  # no coordinator anywhere (and devices are already in use)


# ---- CLI ------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_mesh_flags():
    r = _cli("train", "--help")
    assert r.returncode == 0 and all(f in r.stdout for f in ("--mesh", "--[no]fsdp", "--[no]distributed"))
    r = _cli("generate", "--prompt", "hi", "--mesh", "data=2,model=2")
    assert r.returncode == 2 and "needs 4 devices but 1 are available" in r.stderr
    assert "Traceback" not in r.stderr


# ---- 8 simulated devices --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    script = Path(__file__).resolve().parents[1] / "sharding_checks.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path_factory.mktemp("sharded"))],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_weights_are_split(sharded):
    w = sharded["weights"]
    assert w["target_q_proj"] == dict(shape=[32, 32], shard=[32, 8], spec="P(None, 'model')")
    assert w["drafter_markov_w2"] == dict(shape=[8, 48], shard=[8, 12], spec="P(None, 'model')")
    assert w["target_embed"]["spec"] == "P(None, None)"  # vocabulary 97: not divisible by 4, replicated


def test_weights_are_placed_onto_their_shardings_while_loading(sharded):
    loaded, w = sharded["loading"], sharded["weights"]
    assert loaded["equal"] and loaded["q_proj"] == w["target_q_proj"] and loaded["embed"] == w["target_embed"]


@pytest.mark.parametrize("case", ["dspark@data=2,model=4", "oracle@data=8", "autoregressive@data=8"])
def test_sharded_generation_equals_single_device(sharded, case):
    g = sharded["generation"][case]
    assert g["equal"], g  # token for token, and the same rounds / accept lengths
    assert "P('data', None)" in g["input_specs"]  # prompts split over data
    assert g["all_reduce"]  # a partitioned program
    if "model" in case:
        assert "P(None, 'model')" in g["input_specs"] and "P('model', None)" in g["input_specs"]
    if case.startswith("oracle"):
        assert min(g["accept_len"]) > 4  # every draft accepted: multi-token rounds are exercised


@pytest.mark.parametrize("case", ["data=8", "data=2,model=4,fsdp"])
def test_sharded_training_equals_single_device(sharded, case):
    t = sharded["training"][case]
    assert t["steps"] == 2
    assert t["loss"] == pytest.approx(t["ref_loss"], rel=1e-5)
    # Adam divides each gradient element by its own RMS, so float noise in tiny gradients becomes noise of
    # order lr in the update: compare to a tenth of one step (lr = 3e-3); a missed gradient reduction
    # would be off by a whole step.
    assert t["max_param_diff"] < 3e-4, t["max_param_diff"]
    if case.endswith("fsdp"):
        assert t["split"]["q_proj"] == dict(shape=[32, 32], shard=[16, 8], spec="P('data', 'model')")
        assert t["split"]["q_proj_after"] == t["split"]["q_proj"]  # the step keeps the layout
        assert t["split"]["target_q_proj"]["shard"] == [16, 8]
