"""Student latency on this host: fp32 vs int8-served (static int8, int ops).

For each student at 224 px: median wall time (ms) of a jit-compiled forward
at batch 1 and batch 32, fp32 (`quant=None`) against the int8 artefact
(`quant.calibrate` -> `quant.convert` -> `quant.serve_apply`, int8 weights,
int8 x int8 -> int32 matmuls and convs). Weights are random: latency does
not depend on their values. Also reports parameter bytes and the cosine
similarity of int8 and fp32 embeddings as a sanity check. GhostNetV3 is
timed in its deploy (re-parameterised) form, the one that is served.

The served HLO really is s8 x s8 -> s32 (the float kernels are dead code
and removed), but XLA:CPU's int8 dot/conv is not faster than its fp32 path
on this host, so int8 is not expected to win on latency here; the measured
gain is 4x smaller weights, and the artefact targets int8 accelerators/NPUs.
Run on an otherwise idle host: the JSON records the load average.

  python benchmarks/student_latency.py --students=vit_ti16,resnet18 --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant
from edgevl_jax.export import size
from edgevl_jax.models import students

DEFAULT_STUDENTS = "vit_ti16,vit_s16,swin_t,resnet18,ghostnetv3_100"


def _median_ms(fn, args, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def bench_student(name: str, *, embed_dim: int, batches: tuple[int, ...],
                  repeats: int, warmup: int, image_size: int = 224) -> dict:
  """Latency rows of one student: {batch: {fp32_ms, int8_ms}} and sizes."""
  spec = quant.int8("static")
  # Re-parameterisable students (GhostNetV3) are timed as deployed: folded.
  deploy = ({"deploy": True} if "deploy" in students.allowed_overrides(name)
            else {})
  fp32 = students.build(name, embed_dim=embed_dim, **deploy)
  build = lambda phase: students.build(
      name, embed_dim=embed_dim, quant=spec.replace(phase=phase), **deploy)
  rng = jax.random.PRNGKey(0)
  shape = (1, image_size, image_size, 3)
  variables = jax.jit(fp32.init)(rng, jnp.zeros(shape))
  # Only model state: drop sown collections (BatchNorm input moments).
  variables = {k: v for k, v in variables.items()
               if k in ("params", "batch_stats")}
  # Static ranges from 2 batches, as the paper (smaller: latency only).
  calib = [jax.random.normal(jax.random.PRNGKey(i), (4,) + shape[1:])
           for i in (1, 2)]
  variables = quant.calibrate(build("calibrate").apply, variables, calib)
  served = jax.jit(lambda v, x: quant.convert(build("convert").apply, v, x))(
      variables, calib[0][:1])
  served = jax.device_get(served)
  serve_model = build("serve")
  int8_fn = jax.jit(lambda v, x: quant.serve_apply(serve_model.apply, v, x))
  fp32_fn = jax.jit(fp32.apply)
  fp32_vars = {"params": variables["params"],
               **{k: v for k, v in variables.items()
                  if k not in ("params", quant.QUANT_STATS)}}
  x = calib[1][:1]
  a, b = np.asarray(fp32_fn(fp32_vars, x)), np.asarray(int8_fn(served, x))
  cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
  sizes = quant.served_nbytes(served)
  row = {"name": name, "cosine_int8_vs_fp32": cos,
         "bytes_fp32": size.model_size(fp32_vars)["bytes"],
         "bytes_int8": sizes["total"], "latency_ms": {}}
  for bsz in batches:
    xb = jax.random.normal(jax.random.PRNGKey(3), (bsz,) + shape[1:])
    row["latency_ms"][bsz] = {
        "fp32": _median_ms(fp32_fn, (fp32_vars, xb), repeats, warmup),
        "int8": _median_ms(int8_fn, (served, xb), repeats, warmup),
    }
  return row


def _table(rows: list[dict], batches: tuple[int, ...]) -> str:
  head = f"{'student':<14} {'MB fp32':>8} {'MB int8':>8} {'cos':>6}"
  for bsz in batches:
    head += f" {'b' + str(bsz) + ' fp32':>10} {'b' + str(bsz) + ' int8':>10}"
  lines = [head, "-" * len(head)]
  for r in rows:
    line = (f"{r['name']:<14} {r['bytes_fp32'] / 1e6:8.1f} "
            f"{r['bytes_int8'] / 1e6:8.1f} {r['cosine_int8_vs_fp32']:6.3f}")
    for bsz in batches:
      lat = r["latency_ms"][bsz]
      line += f" {lat['fp32']:10.1f} {lat['int8']:10.1f}"
    lines.append(line)
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--students", default=DEFAULT_STUDENTS,
                      help=f"comma-separated names from {students.NAMES}")
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats, 1 warm-up")
  parser.add_argument("--json",
                      default="benchmarks/results/student_latency.json")
  args = parser.parse_args(argv)
  names = [n for n in args.students.split(",") if n]
  unknown = [n for n in names if n not in students.NAMES]
  if unknown:
    parser.error(f"unknown students {unknown}; choose from {students.NAMES}")
  batches = tuple(int(b) for b in args.batches.split(","))
  repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
  result = {
      "device": str(jax.devices()[0]), "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "repeats": repeats, "warmup": warmup,
      "embed_dim": args.embed_dim, "load_avg_1m": [], "students": [],
  }
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  for name in names:
    result["students"].append(bench_student(
        name, embed_dim=args.embed_dim, batches=batches, repeats=repeats,
        warmup=warmup))
    # Written after every student so a long run keeps what it measured.
    result["load_avg_1m"].append(os.getloadavg()[0])
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"done {name}", flush=True)
  print(_table(result["students"], batches))
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
