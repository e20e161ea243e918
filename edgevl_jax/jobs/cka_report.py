"""Job 'cka_report': teacher-stage x student-stage CKA heat maps of a dataset.

    python -m edgevl_jax.main --config=configs/cka.py:teacher=T,student=S \
        --workdir=DIR

Computes minibatch CKA (Nguyen et al. 2021; `analysis.cka.MinibatchCKA`)
between the CLIP teacher's vision blocks and the student's four stages on
one split, for each requested modality, streaming the split once per
modality. The teacher always sees the same images as the student: RGB for
'rgb', the 3-channel non-RGB image for 'depth' (or 'swir'), which is how the
divergence of the RGB-trained teacher on other modalities shows up.

(Named 'cka' before; the old name still works.)
Writes DIR/cka.json ({modality: matrix dict}), DIR/cka_<modality>.png,
DIR/metrics.jsonl, DIR/report.json (cka.<modality>.{matrix, mean, max},
num_examples, seconds).
"""
from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax.analysis import cka as cka_lib
from edgevl_jax.analysis import features
from edgevl_jax.analysis import heatmap
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import clip_teacher
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.models import clip
from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import runner
from edgevl_jax.utils import io

CKA_FILE = "cka.json"
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      **splits.DATA_SCHEMA,
      "split": f("test", "split to stream"),
      "image_size": f(32, "input side S"),
      "modalities": f(("rgb", "depth"), "'rgb' and/or the non-RGB name"),
      "teacher": f("", "HF CLIP folder or clip_pretrain workdir ('' = a "
                   "random CLIP from teacher_model)"),
      "teacher_normalization": f("clip", "teacher input normalisation"),
      "teacher_model": clip_teacher.MODEL_SCHEMA,
      "student": f("", "student workdir ('' = random from student_model)"),
      "student_model": {"name": f("resnet18", "backbone of the random "
                                  "student"),
                        "normalization": f("imagenet", "its normalisation"),
                        "embed_dim": f(None, "head size (None: pooled)",
                                       int),
                        "overrides": f({}, "backbone fields")},
      "batch_size": f(256, "examples per CKA update"),
      "num_minibatches": f(8, "minibatches per update (>= 4 examples each)"),
      "max_examples": f(0, "stop after this many examples (0: all)"),
      "kernel": f("linear", f"one of {cka_lib.KERNELS}"),
      "sigma": f(None, "RBF bandwidth (None: median heuristic)", float),
      "teacher_blocks": f(None, "teacher blocks (None: OFA-KD's four)",
                          tuple),
      "pooled": f(False, "pooled features instead of token maps"),
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  checks.dataset(config)
  checks.seed(config)
  config_lib.require(config, "kernel", allowed=cka_lib.KERNELS)
  checks.normalization(config, "teacher_normalization")
  for key in ("batch_size", "num_minibatches", "image_size"):
    config_lib.require_positive(config, key, integer=True)
  if config.batch_size % config.num_minibatches or (
      config.batch_size // config.num_minibatches < 4):
    raise ValueError(
        f"config.batch_size={config.batch_size} must split into "
        f"config.num_minibatches={config.num_minibatches} minibatches of >= 4 "
        "examples (unbiased HSIC); raise batch_size or lower num_minibatches.")
  modalities = list(config.modalities)
  info = data_lib.get_info(config.dataset)
  bad = [m for m in modalities if m not in ("rgb", info.other_modality)]
  if not modalities or bad:
    raise ValueError(f"config.modalities must list 'rgb' and/or "
                     f"{info.other_modality!r} for {config.dataset}; found "
                     f"{modalities}.")
  if config.teacher:
    checks.teacher_folder(config, tokenizer=False)
  if config.student:
    checks.student_folder(config, "student")
  else:
    config_lib.require(config, "student_model.name", allowed=students.NAMES)
    checks.normalization(config, "student_model.normalization")


def load_teacher(config: Any) -> tuple[Any, dict[str, Any]]:
  """(model, variables) of the CLIP teacher (a folder or a random CLIP)."""
  if config.teacher:
    model, params = clip.load_pretrained(handoff.teacher_dir(config.teacher))
  else:
    hf = clip_teacher.build_hf_config(config.teacher_model,
                                      image_size=config.image_size,
                                      vocab_size=64)
    model = clip.CLIP(hf)
    params = clip.init_params(model, jax.random.key(config.seed))
  return model, {"params": params}


def load_student(config: Any) -> tuple[Any, dict[str, Any], str]:
  """(model, variables, normalization) of the student."""
  if config.student:
    model, variables, meta = handoff.student_variables(config.student)
    return model, variables, meta.get("normalization", "clip")
  sm = config.student_model
  overrides = dict(sm.overrides)
  overrides.setdefault("image_size", config.image_size)
  model = students.build(sm.name, embed_dim=sm.embed_dim, **overrides)
  shape = (1, config.image_size, config.image_size, 3)
  variables = jax.jit(model.init)(jax.random.key(config.seed + 1),
                                  np.zeros(shape, np.float32))
  return model, nn.unbox(variables), sm.normalization


def dataset_cka(teacher_fn: Any, student_fn: Any, loader: Any, *,
                modality: str, other_modality: str, accumulator: Any,
                num_minibatches: int, max_examples: int = 0,
                mesh: Any = None) -> tuple[np.ndarray, list[str],
                                           list[str], int]:
  """Streams `loader` once: ((I, J) CKA, teacher names, student names, n)."""
  state, update, names, seen = None, None, None, 0
  for batch in loader:
    if max_examples and seen >= max_examples:
      break
    images = features.modality_images(batch, modality, other_modality)
    t, s = teacher_fn(images), student_fn(images)
    if state is None:
      names = (list(t), list(s))
      state = accumulator.init(len(t), len(s))
      update = jax.jit(lambda st, a, b: accumulator.update(
          st, a, b, num_minibatches=num_minibatches))
    xs, ys = list(t.values()), list(s.values())
    if mesh is not None:
      xs, ys = mesh_lib.shard_batch((xs, ys), mesh)
    state = update(state, xs, ys)
    seen += int(images.shape[0])
  if state is None:
    raise ValueError("The split gave no full batch; lower config.batch_size.")
  return np.asarray(accumulator.result(state)), names[0], names[1], seen


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Writes the CKA heat maps of every modality; returns the report."""
  start = time.time()
  workdir = ctx.workdir
  t_model, t_vars = load_teacher(config)
  s_model, s_vars, s_norm = load_student(config)
  blocks = config.teacher_blocks
  teacher_fn = features.feature_fn(
      t_model, t_vars, kind="teacher",
      blocks=None if blocks is None else list(blocks),
      normalization=config.teacher_normalization, pooled=config.pooled)
  student_fn = features.feature_fn(s_model, s_vars, kind="student",
                                   normalization=s_norm, pooled=config.pooled)
  source = data_lib.load_split(config.dataset, config.split,
                               data_dir=config.data_dir,
                               config=config.data_config or None)
  info = data_lib.get_info(config.dataset)
  mesh = ctx.mesh if config.num_minibatches % jax.device_count() == 0 else (
      None)
  accumulator = cka_lib.MinibatchCKA(kernel=config.kernel,
                                     sigma=config.sigma)
  results, report = {}, {"cka": {}}
  with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                progress=False) as writer:
    for step, modality in enumerate(config.modalities):
      loader = data_lib.paired_loader(
          source, batch_size=config.batch_size, image_size=config.image_size,
          train=False, num_epochs=1, drop_remainder=True,
          modalities=("rgb",) if modality == "rgb" else ("other",))
      matrix, t_names, s_names, n = dataset_cka(
          teacher_fn, student_fn, loader, modality=modality,
          other_modality=info.other_modality, accumulator=accumulator,
          num_minibatches=config.num_minibatches,
          max_examples=config.max_examples, mesh=mesh)
      results[modality] = heatmap.to_json(
          matrix, row_labels=t_names, col_labels=s_names, modality=modality,
          num_examples=n, kernel=config.kernel, split=config.split)
      heatmap.save_png(os.path.join(workdir, f"cka_{modality}.png"), matrix,
                       row_labels=t_names, col_labels=s_names,
                       title=f"CKA teacher x student ({modality}, n={n})")
      finite = matrix[np.isfinite(matrix)]
      summary = {"mean": float(finite.mean()) if finite.size else None,
                 "max": float(finite.max()) if finite.size else None}
      report["cka"][modality] = {"matrix": results[modality]["cka"],
                                 "teacher_stages": t_names,
                                 "student_stages": s_names, **summary}
      report["num_examples"] = n
      writer.write(step, {f"cka_mean/{modality}": summary["mean"],
                          "num_examples": n})
  if jax.process_index() == 0:
    io.atomic_write_json(os.path.join(workdir, CKA_FILE), results, indent=1)
  report["seconds"] = time.time() - start
  return report
