"""`dspark serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the serving engine.

    dspark serve                                   # open server: embedded target, shipped drafter + lookup, no tenants
    dspark serve --policy configs/policies/default.yaml --api_keys_file keys.txt --port 8000 --slots 8
    dspark serve --policy policy.yaml --api_keys_file keys.txt --quota_store redis://10.0.0.5:6379/0   # a replica

Routes: POST /v1/completions, POST /v1/chat/completions (stream: true → server-sent events), GET /v1/models,
/health, /metrics (Prometheus), /snapshot.json (with a policy). With --policy every request needs
`Authorization: Bearer <key>`; keys map to the policy's tenants (--api_keys_file: `<key> <tenant>` lines, and/or
$DSPARK_API_KEYS: `key=tenant,...`). Replicas behind a load balancer share quotas and rollback states through one
Redis (--quota_store, or the policy's `store` section). SIGTERM / Ctrl-C: stop accepting, finish in-flight
requests, exit 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import (define_flag, define_serving_flags, kv_buckets_flag, load_target_and_drafter,
                                   run_command)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    define_serving_flags(kv_buckets=True)
    define_flag("string", "policy", None, "Governance policy file (YAML): tenants, workload classes, quotas, "
                "rollback; 'default': the shipped policy. Needs API keys. Without it the server is open (no tenants, "
                "no quotas).")
    define_flag("string", "quota_store", None, "Where quota usage and rollback states live: 'memory' (this "
                "process) or a Redis URL (redis://host:port/db) shared by every replica. Default: the policy's "
                "store.url (memory).")
    define_flag("string", "api_keys_file", None, "File of '<key> <tenant>' lines (also read: $DSPARK_API_KEYS "
                "as 'key=tenant,...'). Keys are required when any are configured.")
    define_flag("string", "host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    define_flag("integer", "port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
    define_flag("integer", "slots", 8, "Concurrent requests of the engine.", lower_bound=1)
    define_flag("integer", "max_len", 1024, "Cache rows per slot: prompt + new tokens + draft block.",
                lower_bound=16)
    define_flag("enum", "engine_policy", "scheduler", "Draft policy of the engine (a policy file's workload classes "
                "refine it per request).", enum_values=["plain", "fixed", "threshold", "scheduler", "scheduler_async"])
    define_flag("string", "cost_table", None, "SPS cost table JSON from `dspark profile` (scheduler policies); "
                "default: profile at start.")
    define_flag("integer", "max_top_k", 64, "Largest top_k a request may use (compiled into the engine).",
                lower_bound=0)
    define_flag("string", "model_name", None, "Model id reported by /v1/models and responses (default: the "
                "--target value, or its file / directory name).")


def body() -> None:
    from dspark_jax.sampling import FilterMode
    from dspark_jax.server.app import create_app, listening_socket, serve
    from dspark_jax.server.auth import ApiKeys
    from dspark_jax.server.backend import Backend
    from dspark_jax.serving.engine import Engine, EngineConfig
    from dspark_jax.serving.cost_table import CostTable

    keys = ApiKeys.load(FLAGS.api_keys_file)
    if FLAGS.quota_store and not FLAGS.policy:
        raise ValueError("--quota_store needs --policy (an open server has no quotas or rollback)")
    governor = None
    if FLAGS.policy:
        from dspark_jax.governance import Governor
        governor = Governor.from_policy_file(FLAGS.policy, store_url=FLAGS.quota_store)
        if not len(keys):
            raise ValueError("--policy needs API keys to know who is calling: give --api_keys_file or set "
                             "$DSPARK_API_KEYS")
        known = {t.name for t in governor.policy.tenants}
        unknown = sorted(keys.tenants - known)
        if unknown:
            raise ValueError(f"API keys name tenants the policy does not define: {', '.join(unknown)} "
                             f"(policy tenants: {', '.join(sorted(known))})")
    table = CostTable.load(FLAGS.cost_table) if FLAGS.cost_table else None
    sock = listening_socket(FLAGS.host, FLAGS.port)  # a busy port fails now, not after loading and compiling
    config = EngineConfig(slots=FLAGS.slots, max_len=FLAGS.max_len,
                          kv_buckets=kv_buckets_flag(FLAGS.kv_buckets, FLAGS.max_len),
                          policy=FLAGS.engine_policy, mode=FilterMode(max_top_k=FLAGS.max_top_k, top_p=True),
                          attn_impl=FLAGS.attn_impl)  # validated before the slow load
    target, drafter = load_target_and_drafter(FLAGS.target, FLAGS.drafter)
    print(f"compiling the engine ({FLAGS.slots} slots × {FLAGS.max_len} rows, cache lengths "
          f"{','.join(map(str, config.cache_lengths))})"
          f"{' and profiling SPS' if FLAGS.engine_policy.startswith('scheduler') and table is None else ''} ...",
          file=sys.stderr)
    engine = Engine(target, drafter, config, cost_table=table)
    governed = None
    if governor is not None:
        from dspark_jax.governance.serving import GovernedEngine
        governed = GovernedEngine(engine, governor)
    name = FLAGS.model_name or Path(FLAGS.target).name  # "gemma3-270m", or the model file / directory name
    app = create_app(Backend(engine, governed), name, keys if len(keys) else None)
    where = (f"policy {FLAGS.policy}, store {governor.store.describe()['url']}" if governor
             else "open: no tenants")
    print(f"serving {name} on http://{FLAGS.host}:{sock.getsockname()[1]} ({where})", file=sys.stderr)
    serve(app, FLAGS.host, FLAGS.port, sock=sock)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("serve", __name__, __doc__, body, argv)
