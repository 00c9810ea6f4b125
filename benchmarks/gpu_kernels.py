"""Pallas kernels on the device: correctness against the references, then speed.

    python benchmarks/gpu_kernels.py [--output benchmarks/results/gpu_kernels.json]   # one GPU, < 10 min
    python benchmarks/gpu_kernels.py --cpu_smoke --output /tmp/gpu_kernels_smoke.json  # CPU, tiny, interpret mode

1. Correctness: verification attention (padded requests, GQA/MQA, sliding window, S not a block multiple) and
   drafter block attention, float32 and bfloat16, kernel ("pallas": Triton on GPU) vs `pallas_kernels.reference`,
   with one KV split and with several.
2. Bandwidth ceiling: a large on-device elementwise copy (read + write bytes / time).
3. Verification attention timings for Gemma-3-270M-like (H=4, KVH=1, D=256) and Qwen3-8B-like (H=32, KVH=8,
   D=128) heads, B x T x S grid, bfloat16, every request verifying T tokens at the end of a full cache:
   kernel vs reference vs `jax.nn.dot_product_attention` (xla, cudnn). Device time from a jitted fori_loop of
   --iters calls. GB/s = K/V bytes a request may see / time; "of copy" = that over the copy rate.
4. Acceptance step (target token_probs over [B, G+1, V] + rejection sampling, as in `decoding.speculative`)
   against one read of the target logits, and XLA's bytes-accessed count in units of the logits' size: how much
   a fused kernel could save. "lean" = the same temperature-1 step restructured in plain JAX (no [B, G+1, V]
   probabilities), i.e. what is available without a kernel.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch, gpu_attention, reference
from pallas_kernels.folding import causal_bounds, fold_queries, next_pow2, unfold_output

MODELS = {"qwen3-8b": (32, 8, 128), "gemma3-270m": (4, 1, 256)}  # (H, KVH, D), timed in this order


# ---- timing -----------------------------------------------------------------------------------------------
def wall_time(fn, *args, repeats: int = 5) -> float:
    """Median seconds of one call of the jitted `fn` (after a warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def loop_time(attend, q, *rest, iters: int) -> float:
    """Device seconds per `attend(q, *rest)` call: `iters` calls chained through q inside one jit."""
    @jax.jit
    def run(q, *rest):
        def body(_, x):
            return x + (attend(x, *rest) * 1e-3).astype(x.dtype)
        return jax.lax.fori_loop(0, iters, body, q)
    return wall_time(run, q, *rest, repeats=3) / iters


def copy_gbps(nbytes: int) -> float:
    """Read + write bytes per second of an on-device elementwise pass over an nbytes bfloat16 array."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    return 2 * nbytes / wall_time(jax.jit(lambda x: x + 1), x, repeats=10) / 1e9


# ---- inputs -----------------------------------------------------------------------------------------------
def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def ragged_positions(b: int, t: int, s: int, seed: int) -> jax.Array:
    """Right-padded positions: q_len 1, T, kv_len = q_len, an all-padding request, then random requests."""
    rng = np.random.default_rng(seed)
    rows = np.full((b, t), -1, np.int32)
    for i in range(b):
        q_len = [1, t, t, 0][i] if i < 4 else int(rng.integers(1, t + 1))
        kv_len = [s, s - 3, q_len, s][i] if i < 4 else int(rng.integers(q_len, s + 1))
        rows[i, :q_len] = np.arange(kv_len - q_len, kv_len)
    return jnp.asarray(rows)


# ---- 1. correctness ---------------------------------------------------------------------------------------
def correctness(impl: str, smoke: bool) -> list[dict]:
    s, d, g = (100, 32, 4) if smoke else (1000, 128, 8)
    b, t = 6, 8
    rows = []
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
        keys = jax.random.split(jax.random.key(0), 6)
        cases = ((8, 2, 33),) if smoke else ((8, 2, None), (8, 2, 33), (4, 1, None))
        for h, kvh, window in cases:
            dd = d if kvh > 1 else 2 * d
            q, k, v = _rand(keys[0], (b, t, h, dd), dtype), _rand(keys[1], (b, s, kvh, dd), dtype), \
                _rand(keys[2], (b, s, kvh, dd), dtype)
            pos = ragged_positions(b, t, s, seed=h + kvh)
            with jax.default_matmul_precision("highest"):  # XLA:GPU's default float32 dot is TF32
                ref = reference.causal_attention(q, k, v, pos, scale=dd ** -0.5, window=window)
            outs = {"dispatch": dispatch.attention(q, k, v, pos, scale=dd ** -0.5, window=window, impl=impl)}
            rows_ = max(16, next_pow2(t * (h // kvh)))
            lo, hi = causal_bounds(pos, h // kvh, rows_, s, window)
            for splits in (1, 4):
                cfg = gpu_attention.GpuConfig(k_splits=splits)
                o = gpu_attention.ranged_attention(fold_queries(q, kvh, rows_), lo, hi, k, v, scale=dd ** -0.5,
                                                   config=cfg, interpret=impl == "interpret")
                outs[f"k_splits={splits}"] = unfold_output(o, t, h)
            for name, out in outs.items():
                rows.append(_compare("verify", name, dtype, tol, out, ref, dict(H=h, KVH=kvh, D=dd, S=s, T=t,
                                                                              window=window)))
        h, kvh = 8, 2
        q, bk, bv = _rand(keys[3], (b, g, h, d), dtype), _rand(keys[4], (b, g, kvh, d), dtype), \
            _rand(keys[5], (b, g, kvh, d), dtype)
        ck, cv = _rand(keys[1], (b, s, kvh, d), dtype), _rand(keys[2], (b, s, kvh, d), dtype)
        ctx_len = jnp.asarray([0, 1, s // 2, s, 7, s - 1][:b], jnp.int32)
        with jax.default_matmul_precision("highest"):
            ref = reference.block_attention(q, ck, cv, ctx_len, bk, bv, scale=d ** -0.5)
        out = dispatch.block_attention(q, ck, cv, ctx_len, bk, bv, scale=d ** -0.5, impl=impl)
        rows.append(_compare("block", "dispatch", dtype, tol, out, ref, dict(H=h, KVH=kvh, D=d, S=s, G=g)))
    return rows


def _compare(kernel, variant, dtype, tol, out, ref, shape) -> dict:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    err = float(np.max(np.abs(out - ref)))
    ok = bool(np.isfinite(out).all() and err <= tol * (1 + float(np.max(np.abs(ref)))))
    row = dict(kernel=kernel, variant=variant, dtype=jnp.dtype(dtype).name, max_abs_err=err, tol=tol, ok=ok, **shape)
    print(f"  {kernel:6s} {variant:11s} {row['dtype']:8s} {shape}: max|err| {err:.2e} {'ok' if ok else 'FAIL'}",
          flush=True)
    return row


# ---- 3. attention timings ---------------------------------------------------------------------------------
def attention_impls(impl: str, smoke: bool) -> dict:
    """name -> attend(q, k, v, pos, mask) for every implementation timed."""
    def kernel(q, k, v, pos, mask, *, scale, window):
        return dispatch.attention(q, k, v, pos, scale=scale, window=window, impl=impl)

    def ref(q, k, v, pos, mask, *, scale, window):
        return reference.causal_attention(q, k, v, pos, scale=scale, window=window)

    def dpa(q, k, v, pos, mask, *, scale, window, implementation):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=implementation)

    impls = {"kernel": kernel, "reference": ref, "dpa_xla": functools.partial(dpa, implementation="xla")}
    if not smoke:
        impls["dpa_cudnn"] = functools.partial(dpa, implementation="cudnn")
    return impls


def time_attention(impl: str, smoke: bool, iters: int, copy_rate: float, budget_s: float, t_start: float) -> list:
    if smoke:
        grid = [("tiny", 4, 1, 32, 2, t, 256, None) for t in (1, 4)]
    else:
        grid = [(m, *MODELS[m], b, t, s, None) for m in MODELS for s in (1024, 4096) for b in (1, 8, 32)
                for t in (1, 4, 8)]
        grid.append(("gemma3-270m", *MODELS["gemma3-270m"], 8, 8, 4096, 512))  # sliding-window layer
    impls = attention_impls(impl, smoke)
    rows = []
    print(f"{'model':12s} {'B':>3s} {'T':>2s} {'S':>5s} {'win':>4s} " + " ".join(f"{n:>16s}" for n in impls))
    for model, h, kvh, d, b, t, s, window in grid:
        if time.perf_counter() - t_start > budget_s:
            print(f"time budget of {budget_s:.0f} s spent: skipping the remaining shapes", flush=True)
            break
        keys = jax.random.split(jax.random.key(b * t + s), 3)
        q, k, v = (_rand(keys[0], (b, t, h, d), jnp.bfloat16), _rand(keys[1], (b, s, kvh, d), jnp.bfloat16),
                   _rand(keys[2], (b, s, kvh, d), jnp.bfloat16))
        pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32)[None], (b, t))
        mask = reference.attention_mask(pos, jnp.broadcast_to(jnp.arange(s)[None], (b, s)), window)
        seen = min(s, window) if window else s
        kv_bytes = 2 * b * seen * kvh * d * 2
        row = dict(model=model, H=h, KVH=kvh, D=d, B=b, T=t, S=s, window=window, kv_bytes=kv_bytes)
        cells = []
        for name, fn in impls.items():
            attend = functools.partial(fn, scale=d ** -0.5, window=window)
            try:
                sec = loop_time(lambda x, k, v, pos, mask: attend(x, k, v, pos, mask), q, k, v, pos, mask,
                                iters=iters)
                gbps = kv_bytes / sec / 1e9
                row[name] = dict(us=sec * 1e6, gbps=gbps, of_copy=gbps / copy_rate)
                cells.append(f"{sec * 1e6:8.1f}us {gbps / copy_rate:5.0%}")
            except Exception as e:  # e.g. cudnn rejecting a shape: record and go on
                row[name] = dict(error=str(e).splitlines()[0][:200])
                cells.append(f"{'n/a':>16s}")
        rows.append(row)
        print(f"{model:12s} {b:3d} {t:2d} {s:5d} {str(window or '-'):>4s} " + " ".join(f"{c:>16s}" for c in cells),
              flush=True)
    return rows


# ---- 5. tile sweep -----------------------------------------------------------------------------------------
TILE_CANDIDATES = ((64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2), (32, 16, 4, 1),
                   (16, 64, 4, 2), (16, 32, 4, 1))  # (block_rows, block_k, num_warps, num_stages); the first = GpuConfig()


def tile_sweep(smoke: bool, iters: int, budget_s: float, t_start: float,
               dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> tuple[list[dict], dict]:
    """Times every TILE_CANDIDATES config of the Triton kernel on its folded shapes (query groups of 4: rows 16 /
    32 / 64 = 1–4 / 8 / 16 query tokens per KV head, every request verifying at the end of S = 1024 keys) of
    both models' heads (Gemma at B 1, Qwen3-8B at B 8), float32 and bfloat16. Returns the rows and the fastest
    config per (dtype, D, rows) — the table `gpu_attention.TUNED` holds."""
    shapes = [("tiny", 1, 1, 32, 2, 16, 64)] if smoke else [
        (m, b, kvh, d, 4, rows, 1024) for m, b, kvh, d in (("gemma3-270m", 1, 1, 256), ("qwen3-8b", 8, 8, 128))
        for rows in (16, 32, 64)]
    rows_out, best = [], {}
    print(f"{'model':12s} {'dtype':8s} {'rows':>4s} " + " ".join(f"{'x'.join(map(str, c)):>10s}"
                                                                    for c in TILE_CANDIDATES))
    for dtype in map(jnp.dtype, dtypes):
        for model, b, kvh, d, group, rows, s in shapes:
            if time.perf_counter() - t_start > budget_s:
                print(f"time budget of {budget_s:.0f} s spent: skipping the remaining sweep shapes", flush=True)
                return rows_out, best
            keys = jax.random.split(jax.random.key(rows + d), 3)
            t = rows // group
            q = _rand(keys[0], (b, kvh, rows, d), dtype)
            k, v = _rand(keys[1], (b, s, kvh, d), dtype), _rand(keys[2], (b, s, kvh, d), dtype)
            pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32)[None], (b, t))
            lo, hi = causal_bounds(pos, group, rows, s, None)
            name = dtype.name
            cells, seen = [], {}
            for cand in TILE_CANDIDATES:
                br, bk, warps, stages = cand
                eff = (min(br, rows), bk, warps, stages)  # the kernel clips block_rows to the rows
                if eff not in seen:
                    cfg = gpu_attention.GpuConfig(block_k=bk, block_rows=br, num_warps=warps, num_stages=stages)
                    attend = functools.partial(gpu_attention.ranged_attention, scale=d ** -0.5, config=cfg,
                                               interpret=smoke)
                    try:
                        seen[eff] = loop_time(attend, q, lo, hi, k, v, iters=iters)
                    except Exception as e:  # e.g. Triton out of shared memory: record and go on
                        seen[eff] = str(e).splitlines()[0][:200]
                sec = seen[eff]
                rows_out.append(dict(model=model, dtype=name, B=b, KVH=kvh, D=d, rows=rows, S=s,
                                     block_rows=br, block_k=bk, num_warps=warps, num_stages=stages,
                                     **({"us": sec * 1e6} if isinstance(sec, float) else {"error": sec})))
                cells.append(f"{sec * 1e6:8.1f}us" if isinstance(sec, float) else f"{'error':>10s}")
            timed = [(sec, eff) for eff, sec in seen.items() if isinstance(sec, float)]
            if timed:
                sec, (br, bk, warps, stages) = min(timed)
                best[f"{name},{d},{rows}"] = dict(block_rows=br, block_k=bk, num_warps=warps, num_stages=stages,
                                                  us=sec * 1e6, default_us=rows_out[-len(TILE_CANDIDATES)].get("us"))
            print(f"{model:12s} {name:8s} {rows:4d} " + " ".join(f"{c:>10s}" for c in cells), flush=True)
    return rows_out, best


# ---- 4. acceptance ----------------------------------------------------------------------------------------
def _lean_step(key, logits, p_draft, tokens):
    """The same temperature-1, unfiltered acceptance without materialising p_target [B, G+1, V]: per-row
    logsumexp, gathers at the drafted tokens, and one softmax row per request for the residual."""
    from dspark_jax.decoding.rejection import accept_flags, residual_distribution

    b, g = tokens.shape
    k_u, k_next = jax.random.split(key)
    lse = jax.nn.logsumexp(logits, axis=-1)
    p_tx = jnp.exp(jnp.take_along_axis(logits[:, :g], tokens[..., None], axis=-1)[..., 0] - lse[:, :g])
    p_dx = jnp.take_along_axis(p_draft, tokens[..., None], axis=-1)[..., 0]
    num = accept_flags(jax.random.uniform(k_u, (b, g)), p_tx, p_dx, jnp.full((b,), g, jnp.int32)).sum(1)
    p_t = jnp.exp(jnp.take_along_axis(logits, num[:, None, None], axis=1)[:, 0]
                  - jnp.take_along_axis(lse, num[:, None], axis=1))
    p_d = jnp.take_along_axis(p_draft, jnp.minimum(num, g - 1)[:, None, None], axis=1)[:, 0]
    dist = jnp.where((num < g)[:, None], residual_distribution(p_t, p_d), p_t)
    return jax.random.categorical(k_next, jnp.log(jnp.maximum(dist, 0.0)), axis=-1).astype(jnp.int32)


def acceptance(batches: list[int], g: int, vocab: int) -> list[dict]:
    from dspark_jax.decoding.rejection import verify
    from dspark_jax.sampling import FilterMode, SamplingParams, token_probs

    rows = []
    for b in batches:
        keys = jax.random.split(jax.random.key(b), 4)
        logits = _rand(keys[0], (b, g + 1, vocab), jnp.float32) * 3
        p_draft = jax.nn.softmax(_rand(keys[1], (b, g, vocab), jnp.float32) * 3, axis=-1)
        tokens = jax.random.randint(keys[2], (b, g), 0, vocab)
        one_pass = wall_time(jax.jit(lambda x: jnp.max(x, axis=-1)), logits)
        variants = (("temperature 1", FilterMode(), 1.0), ("top_p 0.9", FilterMode(top_p=True), 0.9),
                    ("temperature 1, lean", None, 1.0))
        for label, mode, top_p in variants:
            params = SamplingParams.create(b * (g + 1), 1.0, top_p=top_p)

            def step(key, logits, p_draft, tokens, params=params, mode=mode):
                p_t = token_probs(logits.reshape(b * (g + 1), -1), params, mode).reshape(b, g + 1, -1)
                p_dx = jnp.take_along_axis(p_draft, tokens[..., None], axis=-1)[..., 0]
                full_at = lambda k: jnp.take_along_axis(p_draft, k[:, None, None], axis=1)[:, 0]  # noqa: E731
                return verify(key, tokens, p_dx, full_at, p_t, jnp.full((b,), g, jnp.int32)).next_token

            args = (keys[3], logits, p_draft, tokens)
            jitted = jax.jit(step if mode is not None else _lean_step)
            cost = jitted.lower(*args).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            sec = wall_time(jitted, *args)
            row = dict(batch=b, G=g, vocab=vocab, mode=label, step_ms=sec * 1e3, one_logits_pass_ms=one_pass * 1e3,
                       step_over_one_pass=sec / one_pass,
                       xla_bytes_over_logits=float(cost.get("bytes accessed", float("nan"))) / logits.nbytes)
            rows.append(row)
            print(f"  B={b:3d} G={g} {label:20s}: {sec * 1e3:8.2f} ms = {sec / one_pass:5.1f} x one read of the "
                  f"logits ({one_pass * 1e3:.2f} ms); XLA bytes accessed = {row['xla_bytes_over_logits']:.1f} x "
                  f"logits", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="benchmarks/results/gpu_kernels.json")
    ap.add_argument("--cpu_smoke", action="store_true", help="tiny shapes, kernels in interpret mode (CPU)")
    ap.add_argument("--iters", type=int, default=None, help="kernel calls per timed loop (default 50; smoke 2)")
    ap.add_argument("--budget_s", type=float, default=420.0, help="start no attention timing after this many "
                    "seconds of them")
    ap.add_argument("--sweep_budget_s", type=float, default=150.0, help="start no tile-sweep shape after this many "
                    "seconds of the sweep")
    ap.add_argument("--acceptance_batches", default=None, help="comma list (default 1,8,32; smoke 1)")
    ap.add_argument("--skip_acceptance", action="store_true")
    ap.add_argument("--tile_sweep", action="store_true", help="also time TILE_CANDIDATES (float32 and bfloat16) "
                    "and write the fastest per shape to --tiles_output")
    ap.add_argument("--sweep_dtypes", default="float32,bfloat16")
    ap.add_argument("--tiles_output", default=None, help="JSON of the sweep's fastest tiles (device_e2e.py --tiles)")
    return run(ap.parse_args(argv))


def run(args) -> dict:
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    t_start = time.perf_counter()
    smoke = args.cpu_smoke
    backend = jax.default_backend()
    if not smoke and backend != "gpu":
        raise SystemExit(f"no GPU (backend {backend!r}); use --cpu_smoke to run the CPU smoke version")
    impl = "interpret" if smoke else "pallas"
    iters = args.iters or (2 if smoke else 50)
    print(f"== correctness ({impl}, {dispatch.kernel_backend(impl)})", flush=True)
    checks = correctness(impl, smoke)
    sweep, best = [], {}
    if args.tile_sweep:
        print("== tile sweep: us per call of the Triton kernel, (block_rows x block_k x warps x stages)", flush=True)
        sweep, best = tile_sweep(smoke, iters, args.sweep_budget_s, time.perf_counter(),
                                 tuple(args.sweep_dtypes.split(",")))
        if args.tiles_output:
            write_result(args.tiles_output, best)
    copy_rate = copy_gbps(2 ** 24 if smoke else 2 ** 31)
    print(f"== device copy: {copy_rate:.0f} GB/s (read + write)", flush=True)
    print("== verification attention, bfloat16, us per call and share of the copy rate", flush=True)
    timings = time_attention(impl, smoke, iters, copy_rate, args.budget_s, time.perf_counter())
    accept = []
    if not args.skip_acceptance:
        batches = [int(x) for x in (args.acceptance_batches or ("1" if smoke else "1,8,32")).split(",")]
        print("== acceptance step (token_probs + rejection sampling), V=262144", flush=True)
        accept = acceptance(batches, 8, 262144)
    failed = [c for c in checks if not c["ok"]]
    result = dict(machine=describe_machine(), jax_version=jax.__version__, kernel_backend=dispatch.kernel_backend(impl),
                  cpu_smoke=smoke, iters=iters, copy_gbps=copy_rate, correctness=checks, all_correct=not failed,
                  attention=timings, tile_sweep=sweep, tuned=best, acceptance=accept, seconds=time.perf_counter() - t_start)
    write_result(args.output, result)
    if failed:
        raise SystemExit(f"{len(failed)} correctness checks failed")
    return result


if __name__ == "__main__":
    main()
