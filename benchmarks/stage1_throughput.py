r"""Stage-1 (dual-modality KD) training throughput: JAX vs plain PyTorch.

  python benchmarks/stage1_throughput.py --teacher=vit_b16 --student=swin_t \
      --batch=8 --json=benchmarks/results/stage1_throughput.json

One step = frozen teacher forward on the RGB half + student forward/backward
on [other; rgb] (2B images) + AdamW update, at 224 px fp32, jitted. The JAX
step is the trainer's own (`jobs.dual_modality_kd.make_train_step`); with the
teacher-embedding cache the batch carries the teacher embeddings and only the
student runs. The PyTorch reference does the same arithmetic with
`transformers.CLIPVisionModelWithProjection` (teacher, no_grad) and
`transformers.SwinModel` + Linear + LayerNorm (student), `torch.optim.AdamW`,
same thread count, timed interleaved with the JAX steps so that load from
other processes hits both alike. FLOPs come from XLA's `cost_analysis()`;
`mfu` divides the achieved FLOP/s by a measured f32 matmul peak
(`jnp.dot` of two N x N matrices) of this machine, timed interleaved with
the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from edgevl_jax.edgevl import handoff
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import clip
from edgevl_jax.models import students
from edgevl_jax.jobs import dual_modality_kd as kd
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

OPTIM = dict(name="adamw", lr=1e-4, schedule="constant", weight_decay=1e-3,
             grad_clip_norm=5.0)


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", default="vit_b16", choices=size_lib.TEACHERS)
  p.add_argument("--student", default="swin_t", choices=("swin_t",))
  p.add_argument("--batch", type=int, default=8, help="pairs per step")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--peak-n", type=int, default=2048,
                 help="side of the square matmul timed for the peak")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--quick", action="store_true",
                 help="a tiny setting for smoke runs (64 px, batch 2)")
  p.add_argument("--json", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "stage1_throughput.json"))
  a = p.parse_args()
  if a.quick:
    a.image_size, a.batch, a.iters, a.peak_n = 64, 2, 2, 1024
  return a


def _time(fns: list[Callable[[], Any]], warmup: int, iters: int
          ) -> list[float]:
  """Median seconds of each fn, interleaved iteration by iteration."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def matmul_fn(n: int) -> Callable[[], Any]:
  """An n x n x n f32 `jnp.dot` (2 n^3 FLOPs), compiled, ready to time."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
  f(a, a).block_until_ready()
  return lambda: f(a, a).block_until_ready()


def jax_steps(a: argparse.Namespace) -> dict[str, Any]:
  """Jitted full and cached steps with their FLOPs and a runner each."""
  hf = size_lib.clip_config(a.teacher)
  hf.vision_config.image_size = a.image_size
  teacher = clip.CLIP(hf)
  rng = np.random.default_rng(0)
  s = a.image_size
  rgb = jnp.asarray(rng.random((a.batch, s, s, 3), np.float32))
  other = jnp.asarray(rng.random((a.batch, s, s, 3), np.float32))
  tp = jax.jit(lambda k: teacher.init(k, rgb[:1], method="encode_image"))(
      jax.random.key(0))["params"]
  d = hf.projection_dim
  model = students.build(a.student, embed_dim=d, image_size=s)
  mesh = mesh_lib.make_mesh()
  tx = optim_lib.make_optimizer(ml_collections.ConfigDict(OPTIM), 1000)
  state, _ = state_lib.create_train_state(
      lambda k: model.init(k, rgb[:1]), tx, jax.random.key(1), mesh=mesh,
      rules=mesh_lib.REPLICATED_RULES)
  norm = handoff.normalizer("clip")
  step = jax.jit(kd.make_train_step(model, teacher, kind="l1", mode="both",
                                    t_norm=norm, s_norm=norm))
  batch = {"rgb": rgb, "other": other}
  cached = dict(batch, teacher=teacher.apply({"params": tp}, norm(rgb),
                                             method="encode_image"))
  out = {}
  for name, args in (("full", (state, tp, batch)),
                     ("cache", (state, None, cached))):
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = dict(
        flops=float(cost.get("flops", 0.0)), compile_s=time.perf_counter() - t0,
        run=(lambda c=compiled, x=args: jax.block_until_ready(c(*x))))
  return out


def torch_step(a: argparse.Namespace) -> Callable[[], Any]:
  """The same stage-1 step in plain PyTorch (HF models, AdamW)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  vcfg = size_lib._vision_config(a.teacher)  # pylint: disable=protected-access
  vcfg["image_size"] = a.image_size
  teacher = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**vcfg)).eval()
  swin = transformers.SwinModel(transformers.SwinConfig(
      image_size=a.image_size, embed_dim=96, depths=[2, 2, 6, 2],
      num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.2))
  d = vcfg["projection_dim"]
  head = torch.nn.Sequential(torch.nn.Linear(768, d), torch.nn.LayerNorm(d))
  params = list(swin.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
  swin.train()
  s = a.image_size
  rgb = torch.rand(a.batch, 3, s, s)
  other = torch.rand(a.batch, 3, s, s)

  def step():
    with torch.no_grad():
      t = teacher(pixel_values=rgb).image_embeds
      t = torch.nn.functional.normalize(t, dim=-1)
    x = torch.cat([other, rgb])
    emb = head(swin(pixel_values=x).pooler_output)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    loss = (emb - torch.cat([t, t])).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    return loss.item()

  return step


def main() -> None:
  a = _parse()
  steps = jax_steps(a)
  # The peak matmul is timed in the same interleaved loop as the steps, so
  # that on a shared machine it sees the same load (a peak timed alone in a
  # quiet moment or a busy one would skew the MFU either way).
  fns = [steps["full"]["run"], steps["cache"]["run"], matmul_fn(a.peak_n)]
  if not a.skip_torch:
    fns.append(torch_step(a))
  secs = _time(fns, a.warmup, a.iters)
  peak = 2.0 * a.peak_n ** 3 / secs[2]
  torch_s = secs[3] if not a.skip_torch else None
  res = {
      "teacher": a.teacher, "student": a.student, "batch_pairs": a.batch,
      "image_size": a.image_size, "threads": a.threads, "iters": a.iters,
      "device": jax.devices()[0].device_kind,
      "matmul_peak_flops": peak,
      "step_s": secs[0], "step_s_teacher_cache": secs[1],
      "pairs_per_s": a.batch / secs[0],
      "pairs_per_s_teacher_cache": a.batch / secs[1],
      "flops_per_step": steps["full"]["flops"],
      "flops_per_step_teacher_cache": steps["cache"]["flops"],
      "compile_s": steps["full"]["compile_s"],
  }
  res["achieved_flops"] = res["flops_per_step"] / secs[0]
  res["achieved_flops_teacher_cache"] = (
      res["flops_per_step_teacher_cache"] / secs[1])
  res["mfu"] = res["achieved_flops"] / peak
  res["mfu_teacher_cache"] = res["achieved_flops_teacher_cache"] / peak
  res["cache_speedup"] = secs[0] / secs[1]
  if not a.skip_torch:
    res["torch_step_s"] = torch_s
    res["torch_pairs_per_s"] = a.batch / torch_s
    res["ratio_vs_torch"] = res["pairs_per_s"] / res["torch_pairs_per_s"]
    res["ratio_vs_torch_teacher_cache"] = (
        res["pairs_per_s_teacher_cache"] / res["torch_pairs_per_s"])
  print(f"stage 1: teacher {a.teacher}, student {a.student}, {a.batch} pairs "
        f"at {a.image_size} px, fp32, {a.threads} threads")
  print(f"{'variant':<24}{'s/step':>10}{'pairs/s':>10}{'GFLOP/s':>10}"
        f"{'MFU':>8}")
  print(f"{'jax full step':<24}{secs[0]:>10.3f}{res['pairs_per_s']:>10.2f}"
        f"{res['achieved_flops'] / 1e9:>10.1f}{res['mfu']:>8.1%}")
  print(f"{'jax teacher cache':<24}{secs[1]:>10.3f}"
        f"{res['pairs_per_s_teacher_cache']:>10.2f}"
        f"{res['achieved_flops_teacher_cache'] / 1e9:>10.1f}"
        f"{res['mfu_teacher_cache']:>8.1%}")
  if not a.skip_torch:
    print(f"{'pytorch full step':<24}{torch_s:>10.3f}"
          f"{res['torch_pairs_per_s']:>10.2f}")
    print(f"ratio jax/pytorch: {res['ratio_vs_torch']:.2f}x plain, "
          f"{res['ratio_vs_torch_teacher_cache']:.2f}x with the cache")
  print(f"matmul peak {peak / 1e9:.1f} GFLOP/s")
  os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
  with open(a.json, "w") as f:
    json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
