"""`dspark generate`: completions from a target model with the jitted autoregressive loop."""
from __future__ import annotations

import json
import sys

from absl import flags

from dspark_jax.utils.files import atomic_write_text, check_output_file
from dspark_jax.cli.common import (ATTN_IMPL_HELP, ATTN_IMPLS, DISTRIBUTED_HELP, MESH_HELP, TARGET_HELP,
                                   read_prompts_file, run_command, setup_devices)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt", [], "A prompt to complete; repeat the flag for several prompts.")
flags.DEFINE_string("prompts_file", None, 'JSONL file of {"turns": [...]} objects; the first turn of each is a prompt.')
flags.DEFINE_string("target", "gemma3-270m", TARGET_HELP)
flags.DEFINE_integer("max_new_tokens", 64, "Exact number of new tokens per prompt (fewer if a stop token comes).",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = off).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
flags.DEFINE_integer("batch_size", 8, "Prompts decoded together in one batch.", lower_bound=1)
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Parameter/compute dtype; auto = float32 on CPU, bfloat16 on GPU/TPU.")
flags.DEFINE_string("drafter", "none", "Speculative decoding drafter: 'none' (plain autoregressive decoding), 'default' "
                    "(the shipped drafter trained for the target), 'ngram' (prompt lookup: propose what followed the "
                    "last 3..1 tokens' most recent earlier occurrence; 'ngram:n_max=4,n_min=2' sets the lengths), "
                    "'default+ngram' (both; per request and round the draft expected to be accepted further), "
                    "'random' (a randomly initialised drafter of --draft_algorithm: correct output, low "
                    "acceptance), or a drafter directory (exported by `dspark train`, or a DeepSpec DSpark/DFlash "
                    "checkpoint).")
flags.DEFINE_enum("draft_algorithm", "dspark", ["dspark", "dflash", "eagle3"],
                  "Drafter kind for --drafter=random (a checkpoint names its own).")
flags.DEFINE_integer("gamma", None, "Draft block size: tokens proposed per verification round (default: 7 for "
                     "--drafter=random, the trained block size otherwise; a trained drafter accepts any value up "
                     "to its trained size).", lower_bound=1)
flags.DEFINE_float("confidence_threshold", 0.0, "Static confidence threshold in [0, 1]: a proposal is cut at "
                   "the first draft position whose confidence is below it (0 = always verify the full block).")
flags.DEFINE_enum("draft_length", "fixed", ["fixed", "auto"], "'fixed': every round verifies the whole proposal; "
                  "'auto': hardware-aware — per round the verification bucket (every request's anchor plus drafts, "
                  "first for the requests furthest behind; at batch 1 the draft length) that brings the batch's "
                  "slowest request forward the most per second on this machine's cost curve (at batch 1: the most "
                  "expected accepted tokens per second; profiled once per machine, target, drafter and batch "
                  "size, then cached), and plain rounds while drafting is expected to lose.")
flags.DEFINE_integer("draft_vocab_size", 32768, "For --drafter=random: draft vocabulary of the N most frequent "
                     "target tokens (0 = the full target vocabulary).", lower_bound=0)
flags.DEFINE_enum("attn_impl", "reference", ATTN_IMPLS, ATTN_IMPL_HELP)
flags.DEFINE_string("mesh", None, MESH_HELP)
flags.DEFINE_bool("distributed", False, DISTRIBUTED_HELP)
flags.DEFINE_string("output_json", None, "Write a JSON list with prompt, completion_ids, completion_text, "
                    "new_tokens, seconds, tokens_per_s per prompt.")


def body() -> None:
    import jax.numpy as jnp

    from dspark_jax.generation import GenerationConfig, batch_seconds, generate_text, pooled_accept_length
    from dspark_jax.parallel import is_primary
    from dspark_jax.target import load_target

    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        prompts += read_prompts_file(FLAGS.prompts_file)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts_file")
    for i, text in enumerate(prompts):  # before the slow load; over-long prompts need the tokenizer (generate_text)
        if not text.strip():
            raise ValueError(f"prompt {i} is empty")
    if not 0.0 <= FLAGS.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence_threshold must be in [0, 1], got {FLAGS.confidence_threshold}")
    if FLAGS.drafter == "none":
        ignored = [f for f, used in (("--gamma", FLAGS.gamma is not None),
                                     ("--confidence_threshold", FLAGS.confidence_threshold > 0),
                                     ("--draft_length auto", FLAGS.draft_length == "auto")) if used]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} need a drafter: --drafter none decodes plainly")
    output_json = check_output_file(FLAGS.output_json, "--output_json") if FLAGS.output_json else None
    config = GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                              attn_impl=FLAGS.attn_impl, draft_length=FLAGS.draft_length)
    dtype = None if FLAGS.dtype == "auto" else getattr(jnp, FLAGS.dtype)
    from dspark_jax.drafters.factory import check_drafter_spec
    check_drafter_spec(FLAGS.drafter, FLAGS.gamma)
    mesh = setup_devices(FLAGS.mesh, FLAGS.distributed)
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target, dtype=dtype, mesh=mesh)  # weights placed straight onto their shardings
    progress = lambda done, total: print(f"  [{done}/{total}] prompts done", file=sys.stderr)  # noqa: E731
    drafter = None
    if FLAGS.drafter != "none":
        from dspark_jax.drafters.factory import load_drafter
        from dspark_jax.drafters.factory import with_block_size
        drafter = load_drafter(FLAGS.drafter, target, algorithm=FLAGS.draft_algorithm, gamma=FLAGS.gamma or 7,
                               draft_vocab_size=FLAGS.draft_vocab_size or None, seed=FLAGS.seed)
        if FLAGS.gamma:
            drafter = with_block_size(drafter, FLAGS.gamma)
        print(f"drafter: {drafter.source} ({drafter.config.algorithm}, gamma={drafter.config.block_size})",
              file=sys.stderr)
    results = generate_text(target, prompts, config, progress=progress, drafter=drafter,
                            confidence_threshold=FLAGS.confidence_threshold, mesh=mesh)
    for i, r in enumerate(results):
        spec = (f", {r.rounds} rounds ({r.model_rounds} ran the drafter model), accept length "
                f"{r.mean_accept_len:.2f}" if r.mean_accept_len else "")
        rate = (f"{r.tokens_per_s:.1f} tokens/s" if min(config.batch_size, len(results)) == 1 else  # a batch of
                f"in a batch that ran {r.seconds:.2f} s")  # several prompts shares one wall time
        print(f"=== prompt {i}: {r.prompt!r}\n{r.completion_text}\n--- {r.new_tokens} tokens, {rate}{spec}")
    total_tokens = sum(r.new_tokens for r in results)
    total_seconds = batch_seconds(results, config.batch_size)
    print(f"total: {total_tokens} tokens in {total_seconds:.2f} s = {total_tokens / total_seconds:.1f} tokens/s "
          f"(compilation excluded)")
    if drafter is not None:
        tau = pooled_accept_length(results)
        print(f"pooled accept length (committed tokens per verification round, bonus included): "
              f"{'n/a' if tau is None else f'{tau:.3f}'}")
    if output_json and is_primary():
        rows = [{k: v for k, v in r.__dict__.items() if v is not None} for r in results]
        try:
            out = atomic_write_text(output_json, json.dumps(rows, indent=2, ensure_ascii=False))
        except OSError as e:  # past `check_output_file`: a file system that refuses new files (/proc), a full disk
            raise ValueError(f"--output_json {FLAGS.output_json}: cannot write it: {e.strerror}") from None
        print(f"wrote {out}", file=sys.stderr)


def run(argv: list[str]) -> None:
    run_command("generate", __name__, __doc__, body, argv)
