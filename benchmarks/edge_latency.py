"""Edge latency: JAX fp32 / int8-served vs ONNX Runtime (and OpenVINO).

For each student at 224 px (random weights, static int8 calibrated on random
images: latency does not depend on values), batch sizes and thread counts:
median wall ms of

  jax_fp32, jax_int8      jit forward of the Flax student / served int8,
  ort_fp32, ort_int8_u8, ort_int8_s8s8   the ONNX artefact graphs in ONNX
                          Runtime (CPUExecutionProvider, intra-op threads),
  ov_fp32, ov_int8        OpenVINO CPU on the same files (CNN students, when
                          openvino is installed).

Runs are interleaved (one call of every runtime per round, then the next
round), so a change of host load hits all of them alike. JAX threads are set
per process by XLA (the thread column applies to ORT/OpenVINO). Also: file
sizes, and the ORT int8 cosine to the JAX int8 served output. The JSON
records the load average before and after; run on an otherwise idle host.

  python benchmarks/edge_latency.py                  # the issue's table
  python benchmarks/edge_latency.py --quick --students=resnet18 --batches=1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant
from edgevl_jax.export import onnx_export
from edgevl_jax.models import preprocess
from edgevl_jax.models import students

DEFAULT_STUDENTS = "vit_s16,swin_t,resnet18,mobilenet_v2"
CNNS = ("resnet18", "resnet34", "mobilenet_v2")


def _ort(path: str, threads: int):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads
  opts.inter_op_num_threads = 1
  opts.log_severity_level = 3
  sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
  return lambda x: sess.run(None, {"images": x})[0]


def _openvino(path: str, threads: int):
  try:
    import openvino as ov  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  core = ov.Core()
  compiled = core.compile_model(core.read_model(path), "CPU",
                                {"INFERENCE_NUM_THREADS": threads,
                                 "INFERENCE_PRECISION_HINT": "f32"})
  req = compiled.create_infer_request()
  return lambda x: req.infer({"images": x})


def prepare(name: str, *, embed_dim: int, image_size: int, folder: str):
  """(jax fns, onnx file paths, served) of one student."""
  spec = quant.int8("static")
  build = lambda phase=None: students.build(
      name, embed_dim=embed_dim, image_size=image_size,
      quant=None if phase is None else spec.replace(phase=phase))
  shape = (1, image_size, image_size, 3)
  v = jax.jit(build().init)(jax.random.PRNGKey(0), jnp.zeros(shape))
  v = {k: v[k] for k in ("params", "batch_stats") if k in v}
  calib = [preprocess.normalize(jax.random.uniform(
      jax.random.PRNGKey(i), (4,) + shape[1:]), "clip") for i in (1, 2)]
  cal = quant.calibrate(build("calibrate").apply, v, calib)
  served = jax.device_get(jax.jit(lambda v, x: quant.convert(
      build("convert").apply, v, x))(cal, calib[0][:1]))
  meta = dict(name=name, embed_dim=embed_dim, normalization="clip",
              overrides={"image_size": image_size})
  files = {"fp32": onnx_export.student_onnx(meta, v),
           "int8_u8": onnx_export.student_onnx(meta, served, encoding="u8"),
           "int8_s8s8": onnx_export.student_onnx(meta, served,
                                                 encoding="s8s8")}
  paths = {}
  for kind, model in files.items():
    paths[kind] = os.path.join(folder, f"{name}_{kind}.onnx")
    with open(paths[kind], "wb") as f:
      f.write(model.SerializeToString())
  serve = build("serve")
  fp32 = build()

  def unit(e):
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  # Variables are arguments, not closures (XLA would constant-fold them).
  f32 = jax.jit(lambda v, x: unit(fp32.apply(v, preprocess.normalize(
      x, "clip"))))
  i8 = jax.jit(lambda s, x: unit(quant.serve_apply(
      serve.apply, s, preprocess.normalize(x, "clip"))))
  jax_fns = {"jax_fp32": lambda x: f32(v, x),
             "jax_int8": lambda x: i8(served, x)}
  return jax_fns, paths


def bench(name: str, *, embed_dim: int, image_size: int, batches, threads,
          repeats: int, folder: str) -> dict:
  jax_fns, paths = prepare(name, embed_dim=embed_dim, image_size=image_size,
                           folder=folder)
  row = {"name": name, "bytes": {k: os.path.getsize(p)
                                 for k, p in paths.items()}, "ms": {}}
  for t in threads:
    runners = {f"ort_{k}": _ort(p, t) for k, p in paths.items()}
    if name in CNNS:
      for k in ("fp32", "int8_u8"):
        fn = _openvino(paths[k], t)
        if fn is not None:
          runners[f"ov_{k.split('_')[0]}"] = fn
    for b in batches:
      x = np.random.default_rng(b).uniform(
          size=(b, image_size, image_size, 3)).astype(np.float32)
      fns = {**{k: (lambda f: lambda x: jax.block_until_ready(f(x)))(f)
                for k, f in jax_fns.items()}, **runners}
      for f in fns.values():  # warm-up (and compile)
        f(x)
      times = {k: [] for k in fns}
      for _ in range(repeats):  # interleaved rounds
        for k, f in fns.items():
          t0 = time.perf_counter()
          f(x)
          times[k].append((time.perf_counter() - t0) * 1e3)
      ref = np.asarray(jax_fns["jax_int8"](x))
      cos = {k: float(np.min(np.sum(np.asarray(runners[k](x)) * ref, -1)))
             for k in ("ort_int8_u8", "ort_int8_s8s8")}
      row["ms"][f"b{b}_t{t}"] = {k: statistics.median(v)
                                 for k, v in times.items()}
      row.setdefault("cosine_to_jax_int8", {})[f"b{b}_t{t}"] = cos
  return row


def _table(rows) -> str:
  lines = []
  for r in rows:
    lines.append(f"{r['name']}  sizes MB: " + ", ".join(
        f"{k} {v / 1e6:.2f}" for k, v in r["bytes"].items()))
    for cfg, ms in r["ms"].items():
      lines.append(f"  {cfg:<8} " + "  ".join(
          f"{k} {v:8.2f}" for k, v in ms.items()))
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--students", default=DEFAULT_STUDENTS)
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--threads", default="1,2")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2 repeats (not a measurement)")
  parser.add_argument("--json", default="benchmarks/results/edge_latency.json")
  args = parser.parse_args(argv)
  names = [n for n in args.students.split(",") if n]
  unknown = [n for n in names if n not in students.NAMES]
  if unknown:
    parser.error(f"unknown students {unknown}; choose from {students.NAMES}")
  repeats = 2 if args.quick else max(args.repeats, 10)
  result = {"cpu_count": os.cpu_count(), "repeats": repeats,
            "quick": args.quick, "image_size": args.image_size,
            "load_avg_before": list(os.getloadavg()), "students": []}
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with tempfile.TemporaryDirectory() as folder:
    for name in names:
      result["students"].append(bench(
          name, embed_dim=args.embed_dim, image_size=args.image_size,
          batches=[int(b) for b in args.batches.split(",")],
          threads=[int(t) for t in args.threads.split(",")],
          repeats=repeats, folder=folder))
      result["load_avg_after"] = list(os.getloadavg())
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
      print(f"done {name}", flush=True)
  print(_table(result["students"]))
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
