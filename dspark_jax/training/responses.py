"""Regenerating training responses with the target itself (resumable JSONL, failures logged and skipped).

The default target is a base model: prompts are wrapped as "Question: {prompt}\\n\\nAnswer:", which makes
Gemma 3 270M answer (its chat template makes it repeat the question instead). Evaluation uses the same format.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from dspark_jax.decoding.autoregressive import generate
from dspark_jax.generation import pad_batch
from dspark_jax.sampling import FilterMode, SamplingParams

PROMPT_FORMAT = "Question: {prompt}\n\nAnswer:"


def format_prompt(prompt: str, template: str = PROMPT_FORMAT) -> str:
    return template.format(prompt=prompt)


@dataclasses.dataclass(frozen=True)
class RegenConfig:
    max_new_tokens: int = 128
    max_prompt_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    batch_size: int = 16
    seed: int = 0
    template: str = PROMPT_FORMAT


def prompt_ids(target, prompt: str, cfg: RegenConfig) -> list[int]:
    """BOS + the formatted prompt, the question cut to fit `max_prompt_tokens` (the answer cue is kept)."""
    head, _, tail = cfg.template.partition("{prompt}")
    tok = target.tokenizer
    q = tok.encode(prompt, add_bos=False)
    pre, post = tok.encode(head, add_bos=True), tok.encode(tail, add_bos=False)
    budget = max(cfg.max_prompt_tokens - len(pre) - len(post), 1)
    return pre + q[:budget] + post


def _done_indices(path: Path) -> set[int]:
    done = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                try:
                    done.add(json.loads(line)["index"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from an interrupted run: regenerate that one
    return done


def regenerate(target, prompts: Sequence[str], out_path: str | Path, cfg: RegenConfig = RegenConfig(),
               only: Sequence[int] | None = None) -> Path:
    """Appends `{"index", "prompt_ids", "response_ids", "stopped"}` per prompt to `out_path`; prompts already
    there are skipped (resume). A batch that fails is logged to `<out>.errors.jsonl` and skipped. `only`
    restricts the run to these prompt indices."""
    import jax
    import jax.numpy as jnp

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    errors = out_path.with_suffix(".errors.jsonl")
    done = _done_indices(out_path)
    todo = [i for i in (range(len(prompts)) if only is None else only) if i not in done]
    encoded = {i: prompt_ids(target, prompts[i], cfg) for i in todo}
    todo.sort(key=lambda i: len(encoded[i]))  # similar lengths batch together: fewer padded shapes
    params = SamplingParams.create(cfg.batch_size, cfg.temperature, cfg.top_k, cfg.top_p)
    mode = FilterMode.for_run(cfg.temperature, cfg.top_k, cfg.top_p)
    stops = target.stop_ids
    bar = tqdm(total=len(prompts), initial=len(done), desc="regenerating responses", unit="prompt")
    if out_path.exists() and out_path.stat().st_size and not out_path.read_bytes().endswith(b"\n"):
        with out_path.open("a", encoding="utf-8") as out:
            out.write("\n")  # a torn last line from an interrupted run stays isolated (and is ignored)
    with out_path.open("a", encoding="utf-8") as out:
        for s in range(0, len(todo), cfg.batch_size):
            idx = todo[s:s + cfg.batch_size]
            try:
                tokens, lens = pad_batch([encoded[i] for i in idx], target.config.pad_token_id, cfg.batch_size)
                key = jax.random.fold_in(jax.random.key(cfg.seed), idx[0])
                res = generate(target.graphdef, target.state, jnp.asarray(tokens), jnp.asarray(lens), key, params,
                               max_new_tokens=cfg.max_new_tokens, stop_ids=stops, mode=mode,
                               pad_id=target.config.pad_token_id)
                toks, counts = jax.device_get((res.tokens, res.num_tokens))
            except Exception as e:  # noqa: BLE001 - logged and skipped, the run goes on
                logging.exception("batch starting at prompt %d failed", idx[0])
                with errors.open("a", encoding="utf-8") as err:
                    err.write(json.dumps({"indices": idx, "error": repr(e)}) + "\n")
                bar.update(len(idx))
                continue
            for row, i in enumerate(idx):
                resp = [int(t) for t in toks[row, :counts[row]]]
                out.write(json.dumps({"index": i, "prompt_ids": encoded[i], "response_ids": resp,
                                      "stopped": bool(resp and resp[-1] in stops)}) + "\n")
            out.flush()
            bar.update(len(idx))
    bar.close()
    return out_path
