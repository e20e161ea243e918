r"""Memory of the compiled stage-1 step at the paper batch, per option.

  python benchmarks/stage1_memory.py [--teacher=vit_b16] [--student=swin_t]
      [--batch=32] [--image_size=224] [--json=PATH]

The real `dual_modality_kd` train step (teacher forward + student
forward/backward + AdamW update) is lowered and compiled for a 1-device
mesh from abstract shapes only (no weights are materialised, nothing runs)
and XLA's `compiled.memory_analysis()` gives the bytes the step needs:
arguments (state + frozen teacher + batch), temporaries (activations kept
for the backward pass, gradients, workspace) and output. Rows: fp32;
compute_dtype=bfloat16; + teacher_param_dtype=bfloat16; + remat; +
grad_accum=4. XLA:CPU compiles the same program an accelerator would get
from these options, but its buffer assignment is the CPU's: an accelerator
compiler fuses differently, so treat the numbers as the program's needs
(+/- ~10 %), not as a GPU reading. Memory needs no idle machine; the load
average is recorded anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from edgevl_jax.edgevl import handoff
from edgevl_jax.export import size as size_lib
from edgevl_jax.jobs import dual_modality_kd as kd
from edgevl_jax.models import clip
from edgevl_jax.models import students
from edgevl_jax.presets import edgevl as presets
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

GB = 1e9
ROWS = (
    ("fp32", dict()),
    ("bf16", dict(compute_dtype="bfloat16")),
    ("bf16 + bf16 teacher", dict(compute_dtype="bfloat16",
                                 teacher_param_dtype="bfloat16")),
    ("bf16 + bf16 teacher + remat", dict(compute_dtype="bfloat16",
                                         teacher_param_dtype="bfloat16",
                                         remat=True)),
    ("... + grad_accum=4", dict(compute_dtype="bfloat16",
                                teacher_param_dtype="bfloat16", remat=True,
                                grad_accum=4)),
)


def analyse(teacher_name: str, student_name: str, batch: int, size: int,
            options: dict) -> dict:
  """memory_analysis of the compiled step under `options` (GB)."""
  dtype = kd.DTYPES[options.get("compute_dtype", "float32")]
  p_dtype = kd.DTYPES[options.get("teacher_param_dtype", "float32")]
  hf = size_lib.clip_config(teacher_name)
  hf.vision_config.image_size = size  # --image_size < 224: a smoke run
  teacher = clip.CLIP(config=hf, dtype=dtype)
  t_shapes = jax.eval_shape(
      lambda k: clip.init_params(clip.CLIP(config=hf), k), jax.random.key(0))
  t_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, p_dtype),
                          t_shapes)
  embed_dim = hf.projection_dim
  model = students.build(student_name, embed_dim=embed_dim, image_size=size)
  extra = {}
  if dtype != jnp.float32:
    extra["dtype"] = dtype
  if options.get("remat"):
    extra["remat"] = True
  train_model = students.build(student_name, embed_dim=embed_dim,
                               image_size=size, **extra)
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
  tx = optim_lib.make_optimizer(
      ml_collections.ConfigDict(presets.STAGE1_OPTIM), 1000)
  abstract_state = jax.eval_shape(
      lambda: state_lib.create_train_state(
          lambda k: model.init(k, jnp.zeros((1, size, size, 3))), tx,
          jax.random.key(1), mesh=mesh,
          rules=mesh_lib.REPLICATED_RULES)[0])
  norm = handoff.normalizer("clip")
  step = kd.make_train_step(train_model, teacher, kind="l1", mode="both",
                            t_norm=norm, s_norm=norm,
                            grad_accum=int(options.get("grad_accum", 1)))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(
      abstract_state, t_shapes, {"rgb": images, "other": images}).compile()
  mem = compiled.memory_analysis()
  return {
      "args_gb": mem.argument_size_in_bytes / GB,
      "temp_gb": mem.temp_size_in_bytes / GB,
      "output_gb": mem.output_size_in_bytes / GB,
      "alias_gb": mem.alias_size_in_bytes / GB,
      # Donated state aliases its output: peak = arguments + temporaries.
      "peak_gb": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes) / GB,
      "compile_s": time.perf_counter() - t0,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher", default="vit_b16")
  parser.add_argument("--student", default="swin_t")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--rows", default="",
                      help="comma-separated row indices (default: all)")
  parser.add_argument("--json", default=os.path.join(
      os.path.dirname(__file__), "results", "stage1_memory.json"))
  args = parser.parse_args()
  chosen = ([ROWS[int(i)] for i in args.rows.split(",")] if args.rows
            else ROWS)
  load_before = os.getloadavg()
  rows = []
  print(f"stage-1 step, {args.student} student + {args.teacher} teacher, "
        f"{args.batch} pairs at {args.image_size} px, 1 device")
  print(f"{'option':32s} {'args GB':>8s} {'temp GB':>8s} {'peak GB':>8s} "
        f"{'fits 16 GB':>10s}")
  for name, options in chosen:
    r = analyse(args.teacher, args.student, args.batch, args.image_size,
                options)
    r.update(option=name, **{k: v for k, v in options.items()})
    rows.append(r)
    print(f"{name:32s} {r['args_gb']:8.2f} {r['temp_gb']:8.2f} "
          f"{r['peak_gb']:8.2f} {'yes' if r['peak_gb'] < 16 else 'no':>10s}",
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"teacher": args.teacher, "student": args.student,
               "batch": args.batch, "image_size": args.image_size,
               "rows": rows, "load_avg_before": load_before,
               "load_avg_after": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
  main()
