"""Teacher throughput: Flax CLIP `encode_image` vs HF PyTorch, same config.

Measures images/s and achieved FLOP/s of the image tower (ViT-B/16 at 224 by
default, random weights) for the Flax model (jitted) and for
`transformers.CLIPVisionModelWithProjection` (torch.inference_mode) in the
same process, with the same thread count. FLOPs come from XLA's
`cost_analysis()` of the compiled Flax forward; an analytic count (2 FLOPs a
multiply-add, matmuls and convs only) is printed beside it and is used for
the PyTorch FLOP/s, since both run the same arithmetic.

  python benchmarks/teacher_throughput.py --batch=8 --iters=5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--patch-size", type=int, default=16)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--projection-dim", type=int, default=512)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="PyTorch threads; XLA:CPU always uses every core, so "
                 "the default (all cores) makes the two comparable")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="Flax compute dtype (PyTorch runs float32)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--json", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "teacher_throughput.json"))
  return p.parse_args()


def _analytic_flops(a: argparse.Namespace) -> float:
  """Matmul/conv FLOPs of one image through the projected image tower."""
  w, n = a.width, (a.image_size // a.patch_size) ** 2
  t = n + 1
  patch = 2 * n * (3 * a.patch_size ** 2) * w
  per_layer = (2 * t * w * w * 4  # q, k, v, out projections
               + 2 * t * w * 4 * w * 2  # MLP fc1, fc2 (4x width)
               + 2 * t * t * w * 2)  # q k^T and attn v
  return patch + a.layers * per_layer + 2 * w * a.projection_dim


def _time_interleaved(fns: list, warmup: int, iters: int) -> list[list[float]]:
  """Times each fn, alternating between them every iteration, so that load
  from other processes on a shared machine hits every framework alike."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return times


def _hf_config(a: argparse.Namespace):
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.CLIPConfig(
      text_config=dict(hidden_size=512, intermediate_size=2048,
                       num_hidden_layers=1, num_attention_heads=8),
      vision_config=dict(hidden_size=a.width, intermediate_size=4 * a.width,
                         num_hidden_layers=a.layers,
                         num_attention_heads=a.heads,
                         image_size=a.image_size, patch_size=a.patch_size,
                         hidden_act="quick_gelu"),
      projection_dim=a.projection_dim)


def build_flax(a: argparse.Namespace) -> tuple[dict, callable]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from edgevl_jax.models import clip  # pylint: disable=g-import-not-at-top

  model = clip.CLIP(_hf_config(a), dtype=getattr(jnp, a.dtype))
  params = clip.init_params(model, jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (a.batch, a.image_size, a.image_size, 3), np.float32))
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                        method="encode_image"))
  start = time.perf_counter()
  compiled = fn.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  row = {"framework": f"flax (jax {jax.__version__}, {a.dtype})",
         "compile_s": compile_s, "xla_flops_per_batch": xla_flops,
         "device": str(jax.devices()[0])}
  return row, lambda: compiled(params, images).block_until_ready()


def build_torch(a: argparse.Namespace) -> tuple[dict, callable]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(
      _hf_config(a).vision_config).eval()
  images = torch.randn(a.batch, 3, a.image_size, a.image_size)

  def step():
    with torch.inference_mode():
      model(pixel_values=images).image_embeds.sum().item()

  row = {"framework": f"pytorch {torch.__version__} (HF "
                      f"{transformers.__version__}, float32, "
                      f"{model.config._attn_implementation} attention)",
         "threads": torch.get_num_threads()}
  return row, step


def main() -> None:
  a = _parse()
  analytic = _analytic_flops(a) * a.batch
  built = [build_flax(a)] + ([] if a.skip_torch else [build_torch(a)])
  rows = [row for row, _ in built]
  times = _time_interleaved([fn for _, fn in built], a.warmup, a.iters)
  for row, t in zip(rows, times):
    row["times_s"] = t
    row["median_s"] = statistics.median(t)
    row["images_per_s"] = a.batch / row["median_s"]
    flops = row.get("xla_flops_per_batch") or analytic
    row["flops_source"] = ("xla cost_analysis" if "xla_flops_per_batch" in row
                           else "analytic")
    row["achieved_gflops"] = flops / row["median_s"] / 1e9
  print(f"ViT-B/{a.patch_size}-style image tower, width {a.width}, "
        f"{a.layers} layers, {a.image_size}px, batch {a.batch}, "
        f"{a.threads} threads, median of {a.iters} interleaved after {a.warmup} warmup")
  print(f"FLOPs/batch: xla {rows[0]['xla_flops_per_batch'] / 1e9:.1f} G, "
        f"analytic {analytic / 1e9:.1f} G")
  print(f"{'framework':58s} {'median s':>9s} {'img/s':>8s} {'GFLOP/s':>8s}")
  for row in rows:
    print(f"{row['framework'][:58]:58s} {row['median_s']:9.3f} "
          f"{row['images_per_s']:8.2f} {row['achieved_gflops']:8.1f}")
  result = {"args": vars(a), "analytic_flops_per_batch": analytic,
            "machine": {"platform": platform.platform(),
                        "cpu_count": os.cpu_count(),
                        "python": sys.version.split()[0]},
            "rows": rows}
  if len(rows) == 2:
    result["flax_over_torch_throughput"] = (rows[0]["images_per_s"] /
                                            rows[1]["images_per_s"])
    print(f"flax / pytorch throughput: "
          f"{result['flax_over_torch_throughput']:.2f}x")
  os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
  with open(a.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {a.json}")


if __name__ == "__main__":
  main()
