"""Input-pipeline throughput: synthetic data generation and paired loading.

Measures, on this machine:
  1. synthetic RGB-D rendering (numpy sphere-tracer), examples/s per size;
  2. TFDS preparation of a synthetic config (render + serialise + write);
  3. the paired training pipeline (joint random resized crop + flip,
     bicubic, depth min-max, batching) at --image_size, examples/s, on
     (a) synthetic 32 px source images and (b) in-memory 480 x 640 pairs
     the size of ScanNet frames (JPEG/PNG decoding excluded).

  python benchmarks/input_pipeline.py [--image_size=224] [--json=PATH]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from edgevl_jax import data
from edgevl_jax.data.synthetic_rgbd import make_config
from edgevl_jax.data.synthetic_rgbd import render


def _rate(n: int, fn) -> float:
  t0 = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t0)


def bench_render(sizes, num_examples):
  out = {}
  for size in sizes:
    list(render.generate(min(48, num_examples), size, seed=99))  # warm-up
    out[size] = _rate(num_examples, lambda s=size: list(
        render.generate(num_examples, s, seed=0)))
  return out


def bench_prepare(size, num_train, data_dir):
  cfg = make_config(image_size=size, num_train=num_train,
                    num_validation=max(1, num_train // 10),
                    num_test=max(1, num_train // 10), seed=1)
  total = cfg.num_train + cfg.num_validation + cfg.num_test
  builder = data.sources.synthetic_builder(data_dir, cfg)
  return _rate(total, builder.download_and_prepare)


class _InMemory:
  """ScanNet-sized pairs held in memory (decode cost excluded)."""

  def __init__(self, n, h, w):
    rng = np.random.default_rng(0)
    self.rgb = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    self.depth = rng.integers(500, 6000, (n, h, w)).astype(np.uint16)
    self.info = data.get_info("scannet")

  def __len__(self):
    return len(self.rgb)

  def __getitem__(self, i):
    return {"rgb": self.rgb[i], "other": self.depth[i], "label": 0,
            "index": int(i)}


def bench_loader(source, *, image_size, batch_size, num_batches,
                 worker_count):
  src = data.PairedSource(source, lambda r, i: r, info=source.info,
                          split="train") if isinstance(
                              source, _InMemory) else source
  loader = data.paired_loader(src, batch_size=batch_size,
                              image_size=image_size, train=True, seed=0,
                              worker_count=worker_count)
  it = iter(loader)
  next(it)  # start-up (and worker spawn) excluded
  t0 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch_size / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--num_batches", type=int, default=8)
  p.add_argument("--worker_count", type=int, default=0)
  p.add_argument("--render_examples", type=int, default=480)
  p.add_argument("--render_sizes", default="32,48,64")
  p.add_argument("--prepare_train", type=int, default=1200)
  p.add_argument("--json", default=os.path.join(
      os.path.dirname(__file__), "results", "input_pipeline.json"))
  args = p.parse_args()

  rows, result = [], {"args": vars(args), "cpu_count": os.cpu_count()}
  sizes = [int(s) for s in args.render_sizes.split(",")]
  rend = bench_render(sizes, args.render_examples)
  result["render_examples_per_s"] = rend
  rows += [(f"render synthetic RGB-D {s} px", r) for s, r in rend.items()]
  with tempfile.TemporaryDirectory() as d:
    prep = bench_prepare(32, args.prepare_train, d)
    result["tfds_prepare_32px_examples_per_s"] = prep
    rows.append(("TFDS prepare synthetic 32 px (all splits)", prep))
    tiny = data.load_split("synthetic_rgbd", "train", data_dir=d,
                           config=make_config(image_size=32,
                                              num_train=args.prepare_train,
                                              num_validation=max(
                                                  1, args.prepare_train // 10),
                                              num_test=max(
                                                  1, args.prepare_train // 10),
                                              seed=1))
    kw = dict(image_size=args.image_size, batch_size=args.batch_size,
              num_batches=args.num_batches, worker_count=args.worker_count)
    synth = bench_loader(tiny, **kw)
  big = bench_loader(_InMemory(64, 480, 640), **kw)
  result["paired_train_examples_per_s"] = {
      "synthetic_32px_source": synth, "scannet_sized_480x640_source": big}
  rows.append((f"paired train pipeline -> {args.image_size} px "
               "(synthetic 32 px source)", synth))
  rows.append((f"paired train pipeline -> {args.image_size} px "
               "(480x640 source)", big))

  width = max(len(r[0]) for r in rows)
  print(f"{'measurement':<{width}}  examples/s")
  print("-" * (width + 12))
  for name, rate in rows:
    print(f"{name:<{width}}  {rate:10.1f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
