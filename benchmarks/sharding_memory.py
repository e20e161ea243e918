r"""Per-device memory of sharded teachers and students on a virtual mesh.

  python benchmarks/sharding_memory.py [--batch=256] [--json=PATH]

No weights are materialised and no devices are needed: parameter trees come
from `jax.eval_shape` of the real models (teachers from
`export.size.clip_config`, students from `students.build`), shardings from
`layers.LOGICAL_AXIS_RULES` through `train.mesh.param_shardings` on a
`jax.sharding.AbstractMesh`, and the bytes of each device's shard from
`NamedSharding.shard_shape`. Meshes:
  tpu_v4_8:  4 chips (one JAX device per v4 chip: its 2 TensorCores act as
             one megacore), 32 GiB HBM each, mesh data=1 x fsdp=4;
  gpu_8x80:  8 GPUs, 80 GB each, mesh data=1 x fsdp=8.
Rows: the frozen teacher image tower (params fp32 / bf16; no optimiser
state, no gradients), the Swin-T student (params + gradients + AdamW mu/nu,
all fp32) replicated or fsdp-sharded, and activation estimates for a global
batch of `--batch` pairs split over the devices (formulas in `_teacher_act`
and `_student_act`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.export import size as size_lib
from edgevl_jax.models import clip
from edgevl_jax.models import layers
from edgevl_jax.models import students
from edgevl_jax.run import mesh as mesh_lib

GiB = 1024 ** 3
MESHES = {
    "tpu_v4_8": dict(devices=4, hbm_bytes=32 * GiB, label="TPU v4-8 (4x32 GiB)"),
    "gpu_8x80": dict(devices=8, hbm_bytes=80 * 10 ** 9, label="8x80 GB GPU"),
}
REPLICATED = tuple((name, None) for name, _ in layers.LOGICAL_AXIS_RULES)


def _mesh(devices: int) -> jax.sharding.AbstractMesh:
  return jax.sharding.AbstractMesh((1, devices), mesh_lib.AXES)


def per_device_bytes(abstract: Any, mesh: Any, *, itemsize: int | None = None,
                     rules=layers.LOGICAL_AXIS_RULES) -> tuple[int, int]:
  """(bytes on the fullest device, total bytes) of a boxed abstract tree."""
  shardings = mesh_lib.param_shardings(abstract, mesh, rules)
  shapes = jax.tree.leaves(nn.unbox(abstract))
  shard_leaves = jax.tree.leaves(shardings)
  dev, total = 0, 0
  for shape, sh in zip(shapes, shard_leaves):
    size = itemsize or jnp.dtype(shape.dtype).itemsize
    dev += math.prod(sh.shard_shape(shape.shape)) * size
    total += math.prod(shape.shape) * size
  return dev, total


def teacher_tree(name: str) -> tuple[Any, dict[str, Any]]:
  """Boxed abstract image-tower params of teacher `name` and its vision cfg."""
  model = clip.CLIP(size_lib.clip_config(name))
  v = model.config.vision
  images = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3),
                                jnp.float32)
  params = jax.eval_shape(lambda x: model.init(
      jax.random.PRNGKey(0), x, method="encode_image"), images)["params"]
  tower = {k: params[k] for k in ("vision_model", "visual_projection")}
  return tower, size_lib._vision_config(name)  # pylint: disable=protected-access


def _teacher_act(vision: dict[str, Any], batch: int, itemsize: int) -> int:
  """Peak live activations of a frozen (no-grad) forward pass.

  Only one layer is live at a time: the residual stream (T x W), plus either
  q/k/v (3 T W) and the attention probabilities (heads x T x T), or the MLP
  hidden (T x M) and its output (T x W).
  """
  w, m, h = (vision["hidden_size"], vision["intermediate_size"],
             vision["num_attention_heads"])
  t = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
  attn = t * 4 * w + h * t * t
  mlp = t * (2 * w + m)
  return batch * max(attn, mlp) * itemsize


def _student_act(batch_images: int, *, depths=(2, 2, 6, 2), embed=96,
                 image_size=224, window=7) -> int:
  """Swin fp32 activations saved for the backward pass.

  Per block and token about 16 C values (two LayerNorm inputs/outputs, q/k/v,
  attention output, projection, 4C MLP hidden before and after GELU,
  residuals) plus heads x window^2 attention probabilities.
  """
  total = 0
  for i, depth in enumerate(depths):
    side = image_size // 4 // (2 ** i)
    tokens, c, heads = side * side, embed * 2 ** i, 3 * 2 ** i
    total += depth * tokens * (16 * c + heads * window * window)
  return batch_images * total * 4


def student_tree(embed_dim: int) -> Any:
  model = students.build("swin_t", embed_dim=embed_dim)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
                        )["params"]


def table(batch: int) -> list[dict[str, Any]]:
  """One row per (model, precision/layout) with bytes per device per mesh."""
  rows = []
  teachers = {name: teacher_tree(name) for name in ("vit_b16", "vit_l14",
                                                    "vit_g14")}
  for mesh_name, m in MESHES.items():
    mesh = _mesh(m["devices"])
    per_dev_batch = batch // m["devices"]

    def add(model, what, dev, total, note=""):
      rows.append(dict(mesh=mesh_name, model=model, what=what,
                       bytes_per_device=int(dev), bytes_total=int(total),
                       fraction_of_hbm=dev / m["hbm_bytes"], note=note))

    for name, (tree, vision) in teachers.items():
      for label, itemsize in (("fp32", 4), ("bf16", 2)):
        dev, total = per_device_bytes(tree, mesh, itemsize=itemsize)
        add(name, f"params {label} fsdp", dev, total)
        rep, _ = per_device_bytes(tree, mesh, itemsize=itemsize,
                                  rules=REPLICATED)
        add(name, f"params {label} replicated", rep, total)
      act = _teacher_act(vision, per_dev_batch, 2)
      add(name, f"activations bf16 fwd, {per_dev_batch} img/dev", act,
          act * m["devices"], "no-grad forward on RGB")
    s_tree = student_tree(1024)
    for layout, rules in (("replicated", REPLICATED),
                          ("fsdp", layers.LOGICAL_AXIS_RULES)):
      dev, total = per_device_bytes(s_tree, mesh, itemsize=4, rules=rules)
      # params + gradients + AdamW mu and nu, all fp32 and laid out alike.
      add("swin_t (D=1024)", f"params+grads+AdamW fp32 {layout}", 4 * dev,
          4 * total)
    act = _student_act(2 * per_dev_batch)
    add("swin_t (D=1024)", f"activations fp32 train, {2 * per_dev_batch} "
        "img/dev", act, act * m["devices"], "[other; rgb] per pair")
  return rows


def print_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| mesh | model | what | per device (GiB) | % HBM | total (GiB) |",
           "|---|---|---|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['mesh']} | {r['model']} | {r['what']} | "
        f"{r['bytes_per_device'] / GiB:.3f} | "
        f"{100 * r['fraction_of_hbm']:.1f} | {r['bytes_total'] / GiB:.3f} |")
  text = "\n".join(lines)
  print(text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch of pairs")
  parser.add_argument("--quick", action="store_true",
                      help="accepted for run_all; the script is always fast")
  parser.add_argument("--json", default=os.path.join(
      os.path.dirname(__file__), "results", "sharding_memory.json"))
  args = parser.parse_args()
  rows = table(args.batch)
  print_table(rows)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"batch": args.batch, "meshes": MESHES,
               "bytes_per_device": {
                   f"{r['mesh']}.vit_g14_fp32_fsdp": r["bytes_per_device"]
                   for r in rows if r["model"] == "vit_g14"
                   and r["what"] == "params fp32 fsdp"},
               "rules": [list(map(str, r)) for r in layers.LOGICAL_AXIS_RULES],
               "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
