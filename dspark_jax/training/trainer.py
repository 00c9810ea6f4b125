"""Drafter training against a frozen target (spec §2): optax AdamW with linear warmup + cosine decay,
gradient clipping and accumulation, orbax checkpoints with exact resume, console + TensorBoard metrics.

Only the drafter's `nnx.Param`s are trained; the target (embedding, LM head, every layer) is an input
of the step and receives no updates. Master weights are float32; on accelerators the forward runs in
bfloat16 (`compute_dtype`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dspark_jax.drafters.config import DrafterConfig, make_drafter_config
from dspark_jax.drafters.eagle3 import Eagle3Drafter
from dspark_jax.drafters.factory import Drafter
from dspark_jax.drafters.registry import drafter_class
from dspark_jax.drafters.vocab import frequent_token_ids
from dspark_jax.parallel import (is_primary, make_rules, opt_state_shardings, replicate, replicated, shard_batch,
                                 shard_state, shardings_of)
from dspark_jax.training.eagle3_forward import eagle3_ttt_outputs, ttt_loss_floor, ttt_query_rows
from dspark_jax.training.forward import (TrainBatch, block_outputs, draft_labels, target_block_logits, to_batch,
                                         with_online_features)
from dspark_jax.training.heldout import teacher_forced_quality
from dspark_jax.training.losses import DSPARK_ALPHA, dspark_loss, eagle3_ttt_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a drafter training run (spec §5 values are the paper's; see configs/)."""
    algorithm: str = "dspark"
    gamma: int = 7
    num_layers: int = 1
    markov_rank: int = 64
    markov_head_type: str = "vanilla"
    draft_vocab_size: int | None = 16384
    target_layer_ids: tuple[int, ...] | None = None
    lookup_inputs: int = 0    # DSpark/DFlash: prompt-lookup proposals as block inputs (DrafterConfig)
    learning_rate: float = 6e-4
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    epochs: int = 10
    max_steps: int | None = None
    max_sequences: int | None = None  # train on the cache's first N sequences only (learning curves)
    batch_size: int = 4
    grad_accum: int = 1
    num_anchors: int = 64
    max_len: int = 512
    loss_decay: float = 4.0
    loss_weights: tuple[float, float, float] = DSPARK_ALPHA
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    compute_dtype: str = "auto"
    ttt_length: int = 7       # Eagle3: training-time-test steps (spec §2.9)
    ttt_decay: float = 0.8    # Eagle3: step k weighs ttt_decay^k
    ttt_queries: int = 0      # Eagle3: draft starts sampled per sequence (0: every row, the reference's TTT)
    heldout_every: int = 100  # micro-steps between held-out quality evaluations (with a held-out cache)

    def __post_init__(self):
        for name in ("gamma", "num_layers", "epochs", "batch_size", "grad_accum", "num_anchors", "max_len",
                     "log_every", "checkpoint_every", "keep_checkpoints", "ttt_length", "heldout_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train config: learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"train config: warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train config: compute_dtype must be auto|float32|bfloat16, got {self.compute_dtype}")
        if self.ttt_queries < 0 or (self.ttt_queries and self.algorithm != "eagle3"):
            raise ValueError(f"train config: ttt_queries must be >= 0 (and 0 unless algorithm is eagle3), got "
                             f"{self.ttt_queries}")
        if not self.ttt_decay > 0:
            raise ValueError(f"train config: ttt_decay must be > 0, got {self.ttt_decay}")

    @property
    def alpha(self) -> tuple[float, float, float]:
        return (1.0, 0.0, 0.0) if self.algorithm == "dflash" else tuple(self.loss_weights)

    def drafter_config(self, target) -> DrafterConfig:
        return make_drafter_config(self.algorithm, target, block_size=self.gamma, num_layers=self.num_layers,
                                   draft_vocab_size=self.draft_vocab_size, markov_rank=self.markov_rank,
                                   markov_head_type=self.markov_head_type, target_layer_ids=self.target_layer_ids,
                                   lookup_inputs=self.lookup_inputs)


def lr_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Spec §2.8: lr·(s+1)/W for s < W = int(warmup_fraction·total), then cosine from lr to 0."""
    warmup = int(config.warmup_fraction * total_steps)
    cosine = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup, 1))
    if warmup == 0:
        return cosine
    return optax.join_schedules([lambda s: config.learning_rate * (s + 1) / warmup, cosine], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    inner = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                        optax.adamw(lr_schedule(config, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                                    weight_decay=config.weight_decay))
    return optax.MultiSteps(inner, every_k_schedule=config.grad_accum) if config.grad_accum > 1 else inner


def cache_vocab(cache, size: int, vocab_size: int, always: tuple[int, ...]) -> np.ndarray:
    """The draft vocabulary: the most frequent tokens of the training sequences (prompts + responses)."""
    return frequent_token_ids((cache.sample(i)["tokens"] for i in range(len(cache))), size, vocab_size, always)


def init_drafter(target, cache, config: TrainConfig, dtype=jnp.float32):
    dc = config.drafter_config(target.config)
    vocab = None
    if dc.draft_vocab_size:
        always = tuple(sorted(set(target.stop_ids) | {dc.mask_token_id, target.config.bos_token_id or 0}))
        vocab = cache_vocab(cache, dc.draft_vocab_size, target.config.vocab_size, always)
    return drafter_class(dc)(dc, target.config, dtype=dtype, rngs=nnx.Rngs(config.seed), draft_vocab_ids=vocab)


def loss_fn(params, rest, graphdef, target_graphdef, target_state, batch: TrainBatch, key, config: TrainConfig,
            compute_dtype):
    if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    drafter = nnx.merge(graphdef, params, rest)
    target = nnx.merge(target_graphdef, target_state)
    if batch.features is None:  # online mode: no target cache
        batch = with_online_features(target, batch, drafter.config.target_layer_ids)
    if isinstance(drafter, Eagle3Drafter):
        queries = ttt_query_rows(key, batch.loss_mask, config.ttt_queries) if config.ttt_queries else None
        log_probs, target_probs, masks = eagle3_ttt_outputs(drafter, target, batch, config.ttt_length, queries)
        loss, metrics = eagle3_ttt_loss(log_probs, target_probs, masks, decay=config.ttt_decay)
        kl = metrics["loss_per_step"] - ttt_loss_floor(target_probs, masks)  # the loss above the target's entropy
        weights = jnp.float32(config.ttt_decay) ** jnp.arange(config.ttt_length, dtype=jnp.float32)
        return loss, dict(metrics, kl_per_step=kl, kl=jnp.sum(weights * kl))
    blocks, logits, conf, _ = block_outputs(drafter, target, batch, key, config.num_anchors)
    t_logits, lse = target_block_logits(drafter, target, batch, blocks)
    labels = draft_labels(drafter, blocks.labels)
    return dspark_loss(logits, t_logits, lse, labels, conf if drafter.confidence is not None else None,
                       blocks.eval_mask, alpha=config.alpha, decay=config.loss_decay)


def heldout_caches(heldout) -> dict:
    """{name: cache} from `Trainer`'s heldout argument: None → {}, one cache → {"heldout": cache}, a mapping as
    it is. Raises ValueError for a name that is empty or contains "/" (it becomes a metric prefix)."""
    if heldout is None:
        return {}
    caches = dict(heldout) if isinstance(heldout, Mapping) else {"heldout": heldout}
    for name in caches:
        if not name or "/" in name:
            raise ValueError(f"a held-out cache name must be non-empty and without '/', got {name!r}")
    return caches


def heldout_summary(held: dict[str, float]) -> str:
    """One progress line of `Trainer.heldout_quality`'s scores: per cache, τ and the first slots' accuracy."""
    parts: dict[str, list[str]] = {}
    for key, value in held.items():
        name, metric = key.split("/", 1)
        if "slot_accuracy@" not in metric or metric.endswith(("@0", "@1", "@2")):
            parts.setdefault(name, []).append(f"{metric} {value:.3f}")
    return "; ".join(f"{'held-out' if name == 'heldout' else name} {', '.join(shown)}"
                     for name, shown in parts.items())


class Trainer:
    """Owns the run state; `run()` trains to the end (resuming from the latest checkpoint in `workdir`)."""

    def __init__(self, target, cache, config: TrainConfig, workdir: str | Path, mesh: Mesh | None = None,
                 fsdp: bool = False, heldout=None):
        """heldout: a feature cache of the target's outputs for held-out prompts (`dspark prepare-data
        --heldout`), or a mapping {name: cache} of several (e.g. greedy and T = 1 outputs); each one's
        teacher-forced quality (`training.heldout`) is logged every `heldout_every` steps under `<name>/`
        ("heldout/" for a single cache)."""
        import orbax.checkpoint as ocp
        if config.max_sequences is not None:
            cache = cache.first(min(config.max_sequences, len(cache)))
        self.target, self.cache, self.config = target, cache, config
        self.heldout = heldout_caches(heldout)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        on_cpu = jax.default_backend() == "cpu"
        self.compute_dtype = {"auto": jnp.float32 if on_cpu else jnp.bfloat16, "float32": jnp.float32,
                              "bfloat16": jnp.bfloat16}[config.compute_dtype]
        self.steps_per_epoch = len(cache) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the target cache has {len(cache)} sequences, fewer than batch_size={config.batch_size}")
        self.total_micro = config.epochs * self.steps_per_epoch
        self.total_steps = self.total_micro // config.grad_accum
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
            self.total_micro = self.total_steps * config.grad_accum
        module = init_drafter(target, cache, config)
        self.graphdef, self.params, self.rest = nnx.split(module, nnx.Param, ...)
        self.tx = make_optimizer(config, self.total_steps)
        self.mesh, self.target_state = mesh, target.state
        if mesh is None:
            self.opt_state = self.tx.init(self.params)
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
        else:
            self._shard(mesh, make_rules(fsdp))
        self.micro_step = 0
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, save_interval_steps=1))
        self._write_meta(module)

    def _shard(self, mesh: Mesh, rules) -> None:
        """Drafter parameters, frozen target and optimizer state onto `mesh` by their logical axes (data
        parallel, tensor parallel over `model`, FSDP with `rules=make_rules(fsdp=True)`); the jitted step
        keeps them there (`out_shardings`) and takes batches split over `data`."""
        if self.config.batch_size % mesh.shape.get("data", 1):
            logging.warning("batch_size %d is not divisible by the mesh's data axis (%d): batches are replicated",
                            self.config.batch_size, mesh.shape["data"])
        self.params, self.rest = shard_state(self.params, mesh, rules), shard_state(self.rest, mesh, rules)
        self.target_state = shard_state(self.target.state, mesh, rules)
        param_sh = shardings_of(self.params)
        opt_sh = opt_state_shardings(self.tx, jax.eval_shape(self.tx.init, self.params), param_sh, mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(self.params)
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1),
                             out_shardings=(param_sh, opt_sh, replicated(mesh)))

    def _write_meta(self, module):
        """run.json beside the checkpoints: configs, target identity, data; a run directory of another
        target is refused (its checkpoints would not fit)."""
        run_file = self.workdir / "run.json"
        if run_file.exists():
            old = json.loads(run_file.read_text()).get("target", {})
            if old.get("fingerprint") not in (None, self.target.config.fingerprint()):
                raise ValueError(f"{self.workdir} holds a run for target {old.get('name')!r}, not for "
                                 f"{self.target.config.name!r}; use another --workdir")
        meta = dict(train_config=dataclasses.asdict(self.config),
                    drafter_config=dataclasses.asdict(module.config),
                    target=dict(name=self.target.config.name, fingerprint=self.target.config.fingerprint(),
                                source=self.target.source),
                    cache=str(getattr(self.cache, "path", "")), total_steps=self.total_steps,
                    steps_per_epoch=self.steps_per_epoch,
                    data=dict(sequences=len(self.cache), response_tokens=int(self.cache.num_loss_tokens)))
        if is_primary():
            (self.workdir / "run.json").write_text(json.dumps(meta, indent=2))

    def _train_step(self, params, opt_state, rest, target_state, batch, key):
        batch.check()
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(params, rest, self.graphdef, self.target.graphdef, target_state, batch, key,
                                         self.config, self.compute_dtype)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return params, opt_state, metrics

    # ---- checkpoints --------------------------------------------------------------------------------
    def _ckpt_tree(self):
        step = jnp.asarray(self.micro_step)
        return dict(params=self.params, rest=self.rest, opt_state=self.opt_state,
                    micro_step=step if self.mesh is None else replicate(step, self.mesh))

    def save(self):
        import orbax.checkpoint as ocp
        self.manager.save(self.micro_step, args=ocp.args.StandardSave(self._ckpt_tree()), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self) -> bool:
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return False
        tree = self.manager.restore(step, args=ocp.args.StandardRestore(self._ckpt_tree()))
        self.params, self.rest, self.opt_state = tree["params"], tree["rest"], tree["opt_state"]
        self.micro_step = int(tree["micro_step"])
        logging.info("resumed from %s at micro step %d", self.workdir, self.micro_step)
        return True

    def heldout_quality(self) -> dict[str, float]:
        """Teacher-forced quality of the current parameters on each held-out cache, keys `<name>/<metric>`
        ({} without one)."""
        if not self.heldout:
            return {}
        module = nnx.merge(self.graphdef, self.params, self.rest)
        drafter = Drafter(module.config, *nnx.split(module), "training")
        out = {}
        for name, cache in self.heldout.items():
            batches = (to_batch(b, self.compute_dtype)
                       for b in cache.batches(self.config.batch_size, self.config.max_len, shuffle=False))
            out.update(teacher_forced_quality(drafter, self.target, batches).as_dict(f"{name}/"))
        return out

    # ---- loop ---------------------------------------------------------------------------------------
    def batches_from(self, micro_step: int):
        """Deterministic data order: epoch e uses permutation(seed + e); resumes at any micro step."""
        epoch, offset = divmod(micro_step, self.steps_per_epoch)
        while True:
            it = self.cache.batches(self.config.batch_size, self.config.max_len, self.config.seed, epoch)
            for i, batch in enumerate(it):
                if i >= self.steps_per_epoch:
                    break
                if i >= offset:
                    yield batch
            epoch, offset = epoch + 1, 0

    def run(self, *, progress: bool = True, stop_at_micro_step: int | None = None) -> Drafter:
        from tqdm import tqdm
        self.restore_latest()
        writer = None
        try:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(str(self.workdir / "tensorboard")) if is_primary() else None
        except ImportError:
            logging.warning("tensorboardX not installed: no TensorBoard event files")
        end = self.total_micro if stop_at_micro_step is None else min(stop_at_micro_step, self.total_micro)
        bar = tqdm(total=self.total_micro, initial=self.micro_step, desc="training drafter", unit="step",
                   disable=not progress)
        target_state = self.target_state
        feature_dtype = self.compute_dtype
        data = self.batches_from(self.micro_step)
        t0, tokens_seen = time.perf_counter(), 0
        base_key = jax.random.key(self.config.seed)
        while self.micro_step < end:
            np_batch = next(data)
            batch = to_batch(np_batch, feature_dtype)
            key = jax.random.fold_in(base_key, self.micro_step)
            if self.mesh is not None:
                batch, key = shard_batch(batch, self.mesh), replicate(key, self.mesh)
            self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.rest, target_state,
                                                              batch, key)
            self.micro_step += 1
            tokens_seen += int(np.asarray(np_batch["loss_mask"]).sum())
            bar.update(1)
            if self.micro_step % self.config.log_every == 0 or self.micro_step == end:
                m = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                scalars = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
                scalars["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
                shown = {"loss": f"{scalars['loss']:.3f}"}
                if "tau_probabilistic" in scalars:  # only losses with a confidence head estimate τ
                    shown["tau"] = f"{scalars['tau_probabilistic']:.2f}"
                bar.set_postfix(**shown)
                if writer:
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", v, self.micro_step)
                    for k, v in m.items():
                        if np.ndim(v) == 1:
                            for i, x in enumerate(v):
                                writer.add_scalar(f"train/{k}@{i}", float(x), self.micro_step)
                if is_primary():
                    with (self.workdir / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(dict(micro_step=self.micro_step, **scalars, **{
                            k: np.asarray(v).tolist() for k, v in m.items() if np.ndim(v) == 1})) + "\n")
            if self.heldout and (self.micro_step % self.config.heldout_every == 0 or self.micro_step == end):
                held = self.heldout_quality()
                if held:
                    bar.write(f"step {self.micro_step}: {heldout_summary(held)}")
                    if writer:
                        for k, v in held.items():
                            writer.add_scalar(k, v, self.micro_step)
                    if is_primary():
                        with (self.workdir / "metrics.jsonl").open("a") as f:
                            f.write(json.dumps(dict(micro_step=self.micro_step, **held)) + "\n")
            if self.micro_step % self.config.checkpoint_every == 0 or self.micro_step == end:
                self.save()
        bar.close()
        if writer:
            writer.close()
        module = nnx.merge(self.graphdef, self.params, self.rest)
        graphdef, state = nnx.split(module)
        return Drafter(module.config, graphdef, state, str(self.workdir))
