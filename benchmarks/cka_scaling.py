r"""Time and peak memory of minibatch CKA vs full-Gram CKA as n grows.

  python benchmarks/cka_scaling.py                 # n up to 50,000, p=4096
  python benchmarks/cka_scaling.py --quick         # n up to 8,000, p=1024

Three ways to get linear CKA between two (n, p) representations:
  gram      full n x n Gram matrices (unbiased HSIC, `cka_from_grams`): time
            O(n^2 p), memory O(n^2 + n p); the features must all be resident.
  minibatch `MinibatchCKA` over minibatches of b examples, features generated
            and consumed chunk by chunk: time O(n b p), memory O(b^2 + b p).
  feature   the exact linear feature-space form (p x p products): memory
            O(p^2 + n p) (features resident); only with --feature.

Features are synthetic but related (x = z A, y = relu(z B) + noise, z of
width 64), generated in chunks from a fixed seed so every method sees the same
data; seconds include generating the features, not compiling. Each
(method, n) runs in a fresh subprocess; peak memory is that
process's max RSS minus its RSS after importing JAX. The gram line stops at
the first n whose predicted footprint 4 (4 n^2 + 2 n p) bytes (K, L, their
centred copies, the features) exceeds --mem_budget_gb, instead of risking the
machine's memory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

WIDTH_Z = 64


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _chunks(n: int, p: int, chunk: int, seed: int = 0):
  import jax
  import jax.numpy as jnp
  key = jax.random.key(seed)
  ka, kb = jax.random.split(key)
  a = jax.random.normal(ka, (WIDTH_Z, p)) / WIDTH_Z**0.5
  b = jax.random.normal(kb, (WIDTH_Z, p)) / WIDTH_Z**0.5

  @jax.jit
  def make(i):
    kz, kn = jax.random.split(jax.random.fold_in(key, i))
    z = jax.random.normal(kz, (chunk, WIDTH_Z))
    y = jax.nn.relu(z @ b) + 0.5 * jax.random.normal(kn, (chunk, p))
    return z @ a, y

  for i in range(n // chunk):
    yield make(jnp.int32(i))


def _run_one(method: str, n: int, p: int, b: int, queue) -> None:
  import jax
  from edgevl_jax.analysis import cka as cka_lib
  jax.config.update("jax_default_matmul_precision", "highest")
  base = _rss_mb()
  sds = lambda rows: jax.ShapeDtypeStruct((rows, p), jax.numpy.float32)
  if method == "minibatch":
    acc = cka_lib.MinibatchCKA()
    per_step = 8  # minibatches per jitted update
    state = acc.init(1, 1)
    update = jax.jit(lambda s, x, y: acc.update(
        s, [x], [y], num_minibatches=per_step)).lower(
            state, sds(b * per_step), sds(b * per_step)).compile()
    start = time.perf_counter()
    for x, y in _chunks(n, p, b * per_step):
      state = update(state, x, y)
    value = float(acc.result(state)[0, 0])
  else:
    if method == "gram":
      fn = jax.jit(lambda x, y: cka_lib.cka_from_grams(
          cka_lib.gram_linear(x), cka_lib.gram_linear(y), unbiased=True))
    else:
      fn = jax.jit(lambda x, y: cka_lib._linear_feature_space(  # pylint: disable=protected-access
          x, y, unbiased=True))
    fn = fn.lower(sds(n), sds(n)).compile()
    start = time.perf_counter()
    xs, ys = zip(*_chunks(n, p, min(n, 2000)))
    x, y = jax.numpy.concatenate(xs), jax.numpy.concatenate(ys)
    del xs, ys
    value = float(fn(x, y))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  queue.put({"method": method, "n": n, "p": p, "minibatch": b,
             "seconds": seconds, "peak_mb": peak - base, "cka": value})


def measure(method: str, n: int, p: int, b: int) -> dict:
  ctx = mp.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_run_one, args=(method, n, p, b, queue))
  proc.start()
  proc.join()
  if proc.exitcode != 0:
    return {"method": method, "n": n, "p": p, "error": f"exit {proc.exitcode}"}
  return queue.get()


def gram_bytes(n: int, p: int) -> int:
  return 4 * (4 * n * n + 2 * n * p)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="n up to 8,000 with p=1024")
  parser.add_argument("--ns", type=str, default="",
                      help="comma-separated n (multiples of 8 * minibatch)")
  parser.add_argument("--p", type=int, default=0)
  parser.add_argument("--minibatch", type=int, default=250)
  parser.add_argument("--mem_budget_gb", type=float, default=8.0)
  parser.add_argument("--feature", action="store_true",
                      help="also time the feature-space linear form")
  parser.add_argument("--json", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "cka_scaling.json"))
  args = parser.parse_args()
  p = args.p or (1024 if args.quick else 4096)
  default_ns = ("2000,4000,8000" if args.quick
                else "2000,4000,8000,16000,32000,50000")
  ns = [int(v) for v in (args.ns or default_ns).split(",")]
  rows, stopped = [], None
  methods = ["minibatch", "gram"] + (["feature"] if args.feature else [])

  def save():  # after every row, so a long run that is cut off keeps data
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"p": p, "minibatch": args.minibatch, "rows": rows,
                 "gram_stopped": stopped}, f, indent=1)

  for n in ns:
    for method in methods:
      if method == "gram" and gram_bytes(n, p) > args.mem_budget_gb * 2**30:
        stopped = stopped or {
            "n": n, "predicted_gb": gram_bytes(n, p) / 2**30,
            "budget_gb": args.mem_budget_gb}
        continue
      row = measure(method, n, p, args.minibatch)
      rows.append(row)
      save()
      print(f"{row['method']:>9} n={n:>6} p={p} "
            f"{row.get('seconds', float('nan')):8.2f} s "
            f"{row.get('peak_mb', float('nan')):9.1f} MB "
            f"cka={row.get('cka', float('nan')):.4f}", flush=True)
  print("\n| method | n | p | seconds | peak MB | CKA |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['n']} | {r['p']} | {r.get('seconds', 0):.2f}"
          f" | {r.get('peak_mb', 0):.0f} | {r.get('cka', float('nan')):.4f} |")
  if stopped:
    print(f"gram stopped at n={stopped['n']}: predicted "
          f"{stopped['predicted_gb']:.1f} GB > budget "
          f"{stopped['budget_gb']} GB")
  save()
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
