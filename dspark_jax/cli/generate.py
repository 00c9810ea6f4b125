"""`dspark generate`: completions from a target model with the jitted autoregressive loop."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import read_prompts_file, run_command

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt", [], "A prompt to complete; repeat the flag for several prompts.")
flags.DEFINE_string("prompts_file", None, 'JSONL file of {"turns": [...]} objects; the first turn of each is a prompt.')
flags.DEFINE_string("target", "gemma3-270m", "Target model: 'gemma3-270m' (the embedded default), a .gguf file "
                    "or a Hugging Face model directory (config.json + *.safetensors).")
flags.DEFINE_integer("max_new_tokens", 64, "Exact number of new tokens per prompt (fewer if a stop token comes).",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = off).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together in one batch.", lower_bound=1)
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Parameter/compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU.")
flags.DEFINE_string("output_json", None, "Write a JSON list with prompt, completion_ids, completion_text, "
                    "new_tokens, seconds, tokens_per_s per prompt.")


def body() -> None:
    import jax.numpy as jnp

    from dspark_jax.generation import GenerationConfig, generate_text
    from dspark_jax.target import load_target

    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        prompts += read_prompts_file(FLAGS.prompts_file)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts_file")
    config = GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
    dtype = None if FLAGS.dtype == "auto" else getattr(jnp, FLAGS.dtype)
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target, dtype=dtype)
    progress = lambda done, total: print(f"  [{done}/{total}] prompts done", file=sys.stderr)  # noqa: E731
    results = generate_text(target, prompts, config, progress=progress)
    for i, r in enumerate(results):
        print(f"=== prompt {i}: {r.prompt!r}\n{r.completion_text}\n--- {r.new_tokens} tokens, "
              f"{r.tokens_per_s:.1f} tokens/s")
    total_tokens = sum(r.new_tokens for r in results)
    bs = min(config.batch_size, len(results))
    total_seconds = sum(r.seconds for i, r in enumerate(results) if i % bs == 0)
    print(f"total: {total_tokens} tokens in {total_seconds:.2f} s = {total_tokens / total_seconds:.1f} tokens/s "
          f"(compilation excluded)")
    if FLAGS.output_json:
        out = Path(FLAGS.output_json)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps([r.__dict__ for r in results], indent=2, ensure_ascii=False))
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)


def run(argv: list[str]) -> None:
    run_command("generate", __name__, __doc__, body, argv)
