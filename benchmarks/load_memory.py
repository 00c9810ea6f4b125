"""Peak host memory of loading a target: each dtype in a fresh process, anonymous memory (RssAnon) sampled every
2 ms while `load_target` runs (file-backed pages of memory-mapped weights are not counted: the kernel can drop them).

    python benchmarks/load_memory.py [--target gemma3-270m --dtypes float32,bfloat16 --output ...]

On a CPU backend the placed model itself lives in host memory, so `increase / model` >= 1; the rest is what loading
held on top of it (the largest tensor being cast / placed: the embedding for Gemma 3). Writes JSON (default
benchmarks/results/load_memory.json). The first load of a GGUF dequantizes it into ~/.cache/dspark_jax: run once
before measuring.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, threading, time
import jax, jax.numpy as jnp

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

jnp.zeros(1).block_until_ready()
from dspark_jax.target import load_target
base = anon_mib(); peak = [base]; stop = threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_mib()); time.sleep(0.002)

thread = threading.Thread(target=sample); thread.start()
t0 = time.perf_counter()
target = load_target(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
jax.block_until_ready(target.state)
seconds = time.perf_counter() - t0
stop.set(); thread.join()
model = sum(x.nbytes for x in jax.tree.leaves(target.state)) / 2**20
print(json.dumps(dict(dtype=sys.argv[2], model_mib=model, increase_mib=peak[0] - base, seconds=seconds)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--output", default="benchmarks/results/load_memory.json")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-c", CHILD, args.target, "float32"], check=True, capture_output=True)  # warm
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, args.target, dtype], check=True, capture_output=True,
                             text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {dtype}: done", file=sys.stderr)
    print(f"{'dtype':>9} {'model MiB':>10} {'peak increase MiB':>18} {'increase / model':>17} {'seconds':>8}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['model_mib']:>10.0f} {r['increase_mib']:>18.0f} "
              f"{r['increase_mib'] / r['model_mib']:>17.2f} {r['seconds']:>8.2f}")
    with open(args.output, "w") as f:
        json.dump(dict(target=args.target, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
