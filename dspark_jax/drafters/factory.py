"""Building and loading drafters for a target: random initialisation or a checkpoint directory."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.data import training_prompts
from dspark_jax.drafters.checkpoint import (checked_calibration, hybrid_row_calibration, is_drafter_dir,
                                           load_drafter_module, read_meta)
from dspark_jax.drafters.config import DrafterConfig, make_drafter_config
from dspark_jax.drafters.corpus import has_shipped_corpus, shipped_corpus
from dspark_jax.drafters.deepspec import load_deepspec_drafter
from dspark_jax.drafters.hybrid import HybridConfig, HybridDrafter
from dspark_jax.drafters.ngram import NgramConfig, NgramDrafter
from dspark_jax.drafters.registry import drafter_class
from dspark_jax.drafters.vocab import frequent_token_ids
from dspark_jax.models.attn_impl import attn_impl_of, with_attn_impl
from dspark_jax.target import Target


@dataclasses.dataclass(frozen=True)
class Drafter:
    """A drafter ready for the speculative loop: NNX graph definition + state, and where it came from."""
    config: DrafterConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    source: str

    def with_attn_impl(self, impl: str) -> "Drafter":
        """This drafter attending with `impl` (`pallas_kernels.AttentionImpl`; ValueError for an unknown one)."""
        if impl == attn_impl_of(self.graphdef, self.state):
            return self
        return dataclasses.replace(self, graphdef=with_attn_impl(self.graphdef, self.state, impl))


def check_drafter_spec(spec: str, gamma: int | None = None) -> None:
    """Fails fast (before any model loads) on a --drafter value `load_drafter` cannot resolve: 'none',
    'random[:<algorithm>]', 'default', 'ngram[:n_max=N,n_min=M]', '<drafter>+ngram[...]' or a directory; for
    lookup alone also on its options and on `gamma` (a trained drafter's range is known once it loads)."""
    model, plus, lookup = spec.partition("+")
    if plus and not (lookup == "ngram" or lookup.startswith("ngram:")):
        raise ValueError(f"a hybrid drafter is '<drafter>+ngram[:n_max=N,n_min=M]', got {spec!r}")
    if model == "ngram" or model.startswith("ngram:"):
        if plus:
            raise ValueError(f"a hybrid drafter pairs a trained (or random) drafter with lookup, got {spec!r}")
        ngram_config(model, 7 if gamma is None else gamma)
        return
    if model in ("none", "default", "random") or model.startswith("random:"):
        return
    if not Path(model).expanduser().exists():
        raise FileNotFoundError(f"drafter not found: {model!r} (expected 'none', 'default', 'random', 'ngram', "
                                f"'<drafter>+ngram' or a drafter directory)")


def ngram_drafter(target: Target, spec: str = "ngram", gamma: int = 7) -> Drafter:
    """A prompt-lookup drafter from a spec "ngram", "ngram:n_max=4,n_min=2" or "ngram:n_max=4:n_min=2" (the form
    for comma-separated lists of drafters); defaults n_max 3, n_min 1; calibrated=0 keeps the confidence's count
    estimate alone instead of passing it through its fitted calibration (`NgramConfig.calibrated`, default on);
    corpus=1 drafts from the target's shipped response corpus where the text has no match (`drafters.corpus`;
    ValueError for a target without one), corpus=0 never — by default on where the target has one (the embedded
    Gemma 3 270M)."""
    fingerprint = target.config.fingerprint()
    config = ngram_config(spec, gamma, corpus_default=has_shipped_corpus(fingerprint))
    table = shipped_corpus(fingerprint) if config.corpus else None
    graphdef, state = nnx.split(NgramDrafter(config, target.config.vocab_size, table))
    return Drafter(config, graphdef, state, spec)


def ngram_config(spec: str, gamma: int, corpus_default: bool = False) -> NgramConfig:
    """The `NgramConfig` of an n-gram drafter spec (`ngram_drafter`) proposing `gamma` tokens (`corpus` as the
    spec says, else `corpus_default`); ValueError naming a bad option or value."""
    name, _, options = spec.partition(":")
    if name != "ngram":
        raise ValueError(f"not an n-gram drafter spec: {spec!r}")
    fields = dict(corpus=corpus_default)
    for item in filter(None, options.replace(":", ",").split(",")):
        key, eq, value = item.partition("=")
        if key not in ("n_max", "n_min", "calibrated", "corpus") or not eq:
            raise ValueError(f"bad n-gram drafter option {item!r} in {spec!r}: expected n_max=N, n_min=N, "
                             f"calibrated=0|1 or corpus=0|1")
        if key in ("calibrated", "corpus"):
            if value not in ("0", "1"):
                raise ValueError(f"n-gram drafter option {key} must be 0 or 1, got {value!r}")
            fields[key] = value == "1"
            continue
        try:
            fields[key] = int(value)
        except ValueError:
            raise ValueError(f"n-gram drafter option {key} must be an integer, got {value!r}") from None
    return NgramConfig(block_size=gamma, **fields)


HYBRID_OPTIONS = ("skip_model_at", "model_prior_strength", "price_model",  # `HybridConfig` fields settable in a spec
                  "row_calibration", "model_draft_length")


def split_hybrid_options(lookup_spec: str) -> tuple[str, dict[str, float]]:
    """"ngram:n_max=4:skip_model_at=2" → ("ngram:n_max=4", {"skip_model_at": 2.0}): the hybrid's own options
    (HYBRID_OPTIONS, floats; "inf" allowed) taken out of the lookup's spec. ValueError on a value that is not a
    number."""
    name, _, options = lookup_spec.partition(":")
    kept, hybrid = [], {}
    for item in filter(None, options.replace(":", ",").split(",")):
        key, _, value = item.partition("=")
        if key not in HYBRID_OPTIONS:
            kept.append(item)
            continue
        try:
            hybrid[key] = float(value)
        except ValueError:
            raise ValueError(f"hybrid drafter option {key} must be a number, got {value!r} in {lookup_spec!r}") from None
    return (f"{name}:{','.join(kept)}" if kept else name), hybrid


def hybrid_drafter(model: Drafter, target: Target, lookup_spec: str = "ngram",
                   skip_model_at: float = HybridConfig.skip_model_at,
                   model_prior_strength: float = HybridConfig.model_prior_strength,
                   price_model: float = HybridConfig.price_model, row_calibration: float = 1,
                   model_draft_length: float | None = HybridConfig.model_draft_length) -> Drafter:
    """`model` and prompt lookup (`lookup_spec`, see `ngram_drafter`) proposing per request whichever draft
    is expected to be accepted further (`drafters.hybrid`; `skip_model_at`, `model_prior_strength`,
    `price_model` (0 or 1 in a spec: "default+ngram:price_model=0"), `model_draft_length` (a whole number, None:
    the whole block; in a spec "default+ngram:model_draft_length=4"): see `HybridConfig`). `row_calibration` 1: the row calibration the
    model's drafter directory holds, if any (`drafters.hybrid_calibration`); 0: none."""
    for name, value in (("price_model", price_model), ("row_calibration", row_calibration)):
        if value not in (0, 1):
            raise ValueError(f"{name} is 0 or 1, got {value:g}")
    if model_draft_length is not None and not (model_draft_length >= 1 and float(model_draft_length).is_integer()):
        raise ValueError(f"model_draft_length is a whole number >= 1, got {model_draft_length:g}")
    if model is None or model.config.algorithm == "ngram":
        raise ValueError("a hybrid drafter pairs a trained (or random) drafter with lookup")
    lookup = ngram_drafter(target, lookup_spec, model.config.block_size)
    weights = (hybrid_row_calibration(model.source) if row_calibration and is_drafter_dir(model.source)
               else None)
    module = HybridDrafter(nnx.merge(model.graphdef, model.state), nnx.merge(lookup.graphdef, lookup.state),
                           skip_model_at=skip_model_at, model_prior_strength=model_prior_strength,
                           price_model=bool(price_model), row_calibration=weights,
                           model_draft_length=None if model_draft_length is None else int(model_draft_length))
    graphdef, state = nnx.split(module)
    whole_block = model.config.block_size  # a spec's model_draft_length >= γ: the whole block (None here)
    options = "".join(f":{k}={float(whole_block if v is None else v):g}"
                      for k, v in (("skip_model_at", skip_model_at), ("model_prior_strength", model_prior_strength),
                                   ("price_model", price_model), ("model_draft_length", model_draft_length))
                      if v != getattr(HybridConfig, k)) + ("" if row_calibration else ":row_calibration=0")
    return Drafter(module.config, graphdef, state, f"{model.source}+{lookup_spec}{options}")


def _frequent_ids(tokenizer, vocab_size: int, size: int, always: tuple[int, ...]) -> np.ndarray:
    ids = (tokenizer.encode(t, add_bos=False) for t in training_prompts())
    return frequent_token_ids(ids, size, vocab_size, always_include=always)


def default_draft_vocab(target: Target, size: int, mask_token_id: int) -> np.ndarray:
    """The `size` most frequent target tokens over the shipped training prompts (never the evaluation
    prompts), always including stop tokens, BOS and the mask token."""
    always = tuple(sorted(set(target.stop_ids) | {mask_token_id, target.config.bos_token_id or 0}))
    return _frequent_ids(target.tokenizer, target.config.vocab_size, size, always)


def random_drafter(target: Target, algorithm: str, *, gamma: int = 7, num_layers: int | None = None,
                   draft_vocab_size: int | None = None, seed: int = 0, dtype=None) -> Drafter:
    """A randomly initialised drafter of any kind (correct output, low acceptance until trained)."""
    config = make_drafter_config(algorithm, target.config, block_size=gamma, num_layers=num_layers,
                                 draft_vocab_size=draft_vocab_size)
    vocab_ids = default_draft_vocab(target, draft_vocab_size, config.mask_token_id) if draft_vocab_size else None
    dtype = dtype or target.state_dtype
    module = drafter_class(config)(config, target.config, dtype=dtype, rngs=nnx.Rngs(seed), draft_vocab_ids=vocab_ids)
    graphdef, state = nnx.split(module)
    return Drafter(config, graphdef, state, f"random:{algorithm}")


SHIPPED_DRAFTERS = Path(__file__).parent / "shipped"


def default_drafter_path(target: Target) -> Path:
    """The shipped drafter trained for this target, if there is one."""
    for d in sorted(SHIPPED_DRAFTERS.glob("*")) if SHIPPED_DRAFTERS.is_dir() else []:
        if is_drafter_dir(d) and read_meta(d)["target"]["fingerprint"] == target.config.fingerprint():
            return d
    raise FileNotFoundError(f"no shipped default drafter for target {target.config.name!r}; train one with "
                            f"`dspark train` and pass --drafter=<workdir>/drafter")


def with_block_size(drafter: Drafter, gamma: int) -> Drafter:
    """The same drafter proposing `gamma` <= its trained block size tokens per round: a DSpark/DFlash block
    of [anchor, MASK × (gamma-1)] (the first slots of the trained block), or `gamma` Eagle3 steps. Fewer
    verified tokens cost less where verification is expensive; output stays lossless."""
    trained = drafter.config.block_size
    if gamma == trained:
        return drafter
    if drafter.config.algorithm == "ngram":  # lookup has no trained size
        return ngram_drafter_like(drafter, gamma)
    if is_hybrid(drafter):
        return _with_hybrid_change(drafter, lambda module: module.set_block_size(gamma))  # checks gamma
    if not 1 <= gamma <= trained:
        raise ValueError(f"gamma must be in [1, {trained}] for this drafter (trained with block size {trained}), "
                         f"got {gamma}")
    return _with_config(drafter, block_size=gamma)


def with_model_draft_length(drafter: Drafter, length: int | None) -> Drafter:
    """The same hybrid drafter with its model drafting the block's first `length` tokens (None: all of them;
    `HybridConfig.model_draft_length`)."""
    if not is_hybrid(drafter):
        raise ValueError(f"model_draft_length is a hybrid drafter's ('<drafter>+ngram'), not {drafter.source!r}'s")
    return _with_hybrid_change(drafter, lambda module: module.set_model_draft_length(length))


def _with_hybrid_change(drafter: Drafter, change) -> Drafter:
    """The same hybrid drafter after `change(module)` (a `HybridDrafter` setter) on its merged module."""
    module = nnx.merge(drafter.graphdef, drafter.state)
    change(module)
    graphdef, state = nnx.split(module)
    return Drafter(module.config, graphdef, state, drafter.source)


def is_hybrid(drafter: Drafter) -> bool:
    """Whether `drafter` is a trained drafter and prompt lookup together (`drafters.hybrid`)."""
    return drafter.config.algorithm.endswith("+ngram")


def _with_config(drafter: Drafter, **changes) -> Drafter:
    """The same drafter with fields of its module's config replaced (no other check)."""
    module = nnx.merge(drafter.graphdef, drafter.state)
    module.config = dataclasses.replace(module.config, **changes)
    graphdef, state = nnx.split(module)
    return Drafter(module.config, graphdef, state, drafter.source)


def with_skip_model_at(drafter: Drafter, skip_model_at: float) -> Drafter:
    """The same hybrid drafter with `HybridConfig.skip_model_at` replaced (0: its model's forward never runs,
    inf: it runs in every round). ValueError for a drafter that is not a hybrid or a negative value."""
    if not is_hybrid(drafter):
        raise ValueError(f"skip_model_at is a hybrid drafter's setting; {drafter.source} is "
                         f"{drafter.config.algorithm}")
    if not skip_model_at >= 0:
        raise ValueError(f"skip_model_at must be >= 0, got {skip_model_at}")
    return _with_config(drafter, skip_model_at=float(skip_model_at))


def with_choice_defaults(drafter: Drafter) -> Drafter:
    """The same drafter with the options that only steer its choices at their defaults: a hybrid's HYBRID_OPTIONS
    and a lookup's `calibrated` (its own or a hybrid's lookup). Other drafters come back unchanged."""
    hybrid = is_hybrid(drafter)
    if not hybrid and drafter.config.algorithm != "ngram":
        return drafter
    module = nnx.merge(drafter.graphdef, drafter.state)
    lookup = module.lookup if hybrid else module
    lookup.config = dataclasses.replace(lookup.config, calibrated=NgramConfig.calibrated)
    if hybrid:
        module.config = dataclasses.replace(module.config, **{k: getattr(HybridConfig, k) for k in HYBRID_OPTIONS})
    graphdef, state = nnx.split(module)
    return Drafter(module.config, graphdef, state, drafter.source)


def ngram_drafter_like(drafter: Drafter, gamma: int) -> Drafter:
    """The same lookup drafter proposing `gamma` tokens."""
    return _with_config(drafter, block_size=gamma)  # NgramConfig checks gamma


def default_drafter(target: Target) -> Drafter:
    """The shipped drafter for `target` (the embedded Gemma 3 270M has one); FileNotFoundError otherwise."""
    return load_drafter("default", target)


def load_drafter(spec: str, target: Target, *, algorithm: str = "dspark", gamma: int = 7,
                 draft_vocab_size: int | None = None, seed: int = 0) -> Drafter | None:
    """`none` → None; `random` → a random drafter of `algorithm`; `default` → the shipped drafter for the
    target; `ngram[:n_max=N,n_min=M]` → prompt lookup proposing `gamma` tokens; a directory → a drafter
    exported by `dspark train`, or a DeepSpec DSpark/DFlash checkpoint."""
    if spec in ("", "none"):
        return None
    if spec == "ngram" or spec.startswith("ngram:"):
        return ngram_drafter(target, spec, gamma)
    if "+" in spec:  # a trained drafter and prompt lookup: "default+ngram", "DIR+ngram:n_max=4:skip_model_at=2"
        model_spec, _, lookup_spec = spec.partition("+")
        if not (lookup_spec == "ngram" or lookup_spec.startswith("ngram:")):
            raise ValueError(f"a hybrid drafter is '<drafter>+ngram[:n_max=N,n_min=M]', got {spec!r}")
        lookup_spec, hybrid_options = split_hybrid_options(lookup_spec)
        return hybrid_drafter(load_drafter(model_spec, target, algorithm=algorithm, gamma=gamma,
                                           draft_vocab_size=draft_vocab_size, seed=seed), target, lookup_spec,
                              **hybrid_options)
    if spec == "random":
        return random_drafter(target, algorithm, gamma=gamma, draft_vocab_size=draft_vocab_size, seed=seed)
    path = default_drafter_path(target) if spec == "default" else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"drafter not found: {spec!r} (expected 'none', 'random', 'default' or a drafter "
                                f"directory)")
    if is_drafter_dir(path):
        module = load_drafter_module(path, target.config, dtype=target.state_dtype)
        graphdef, state = nnx.split(module)
        return Drafter(module.config, graphdef, state, str(path))

    module = load_deepspec_drafter(path, target.config, dtype=target.state_dtype)
    graphdef, state = nnx.split(module)
    return Drafter(module.config, graphdef, state, str(path))


def with_confidence_temperatures(drafter: Drafter, temperatures, biases=None) -> Drafter:
    """The same drafter with confidence-head temperatures T_k and per-position biases β_k replaced (c_k =
    σ(z_k / T_k + β_k); ones and zeros = the raw head; biases None: zeros), one set for every sampling temperature
    (the head's sets per temperature are dropped). Proposals do not depend on them; a
    confidence threshold and the scheduler do; `drafter` itself is left unchanged. Raises ValueError for a drafter
    without a confidence head, temperatures that are not positive and finite, or biases not finite."""
    module = nnx.merge(drafter.graphdef, drafter.state, copy=True)  # merged Variables would alias drafter.state's
    head = getattr(module, "confidence", None)
    if head is None:
        raise ValueError(f"drafter {drafter.source} ({drafter.config.algorithm}) has no confidence head")
    temps, bias = checked_calibration(temperatures, biases, head.temperatures[...].shape[-1])
    head.temperatures.value = jnp.asarray(temps)  # one set, used at every sampling temperature
    head.biases.value = jnp.asarray(bias)
    head.calibrated_at.value = jnp.zeros((1,), jnp.float32)
    graphdef, state = nnx.split(module)
    return Drafter(drafter.config, graphdef, state, drafter.source)
