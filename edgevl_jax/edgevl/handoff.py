"""What EdgeVL stages hand to each other: teacher, text features, students.

A teacher is a Hugging Face CLIP folder (config.json + model.safetensors)
holding its tokenizer files too; `clip_pretrain` writes one into
WORKDIR/teacher so later stages read it exactly like a downloaded checkpoint.
A student is WORKDIR/student.json (architecture, embed_dim, input
normalisation) plus WORKDIR/student_params.msgpack (the selected params)
and, for students with BatchNorm, WORKDIR/student_state.msgpack (their
other variable collections: {'batch_stats': running statistics}), written
by `dual_modality_kd` and `qat_contrastive`. `student_variables` reads all
of it as one variables dict for `model.apply`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.models import clip
from edgevl_jax.models import preprocess
from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib
from edgevl_jax.utils import finite
from edgevl_jax.utils import io

# The teacher keys of the EdgeVL jobs that read the teacher.
TEACHER_SCHEMA: config_lib.Schema = {
    "teacher": config_lib.field("", "HF CLIP folder or a clip_pretrain "
                                "workdir"),
    "teacher_normalization": config_lib.field(
        "clip", "teacher input normalisation ('clip' or 'imagenet')"),
}
STUDENT_FILE = "student.json"
STUDENT_PARAMS = "student_params.msgpack"
STUDENT_STATE = "student_state.msgpack"
TEACHER_DIR = "teacher"


def teacher_dir(path: str) -> str:
  """An HF CLIP folder: `path` itself or `path`/teacher (a stage workdir)."""
  path = os.fspath(path)
  for candidate in (path, os.path.join(path, TEACHER_DIR)):
    if os.path.exists(os.path.join(candidate, "config.json")):
      return candidate
  raise ValueError(
      f"teacher={path!r} is not a Hugging Face CLIP folder (no config.json "
      "in it or in its 'teacher/' subfolder); pass the folder of an HF CLIP "
      "checkpoint or the workdir of a clip_pretrain run.")


def load_teacher(path: str, *, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[clip.CLIP, Any, Any]:
  """(model, params, tokenizer) of a CLIP folder; params fsdp-sharded on mesh.

  The tokenizer is read from the same folder. The folder is checked first
  (`clip.check_clip_folder`: config, weight file headers, tokenizer files
  and that the tokenizer fits the text tower), so a folder without its
  tokenizer fails in milliseconds instead of giving chance-level zero-shot.
  """
  folder = teacher_dir(path)
  clip.check_clip_folder(folder)
  model, params = clip.load_pretrained(folder)
  if mesh is not None:
    shardings = clip.param_shardings(model, mesh)
    params = jax.tree.map(jax.device_put, params, nn_unbox(shardings))
  return model, params, clip.load_tokenizer(folder)


def nn_unbox(tree: Any) -> Any:
  """Unboxes flax partitioning metadata (shardings come back boxed)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)


def text_features(model: clip.CLIP, params: Any, tokenizer: Any,
                  names: Sequence[str], templates: Sequence[str]
                  ) -> np.ndarray:
  """(C, D) L2-normalised, prompt-ensembled text features as numpy."""
  return np.asarray(clip.zero_shot_classifier(
      model, params, tokenizer, list(names), list(templates)), np.float32)


def normalizer(kind: str):
  """images in [0, 1] -> model input, for kind 'clip' or 'imagenet'."""
  if kind not in ("clip", "imagenet"):
    raise ValueError(f"normalization must be 'clip' or 'imagenet', found "
                     f"{kind!r}.")
  return lambda x: preprocess.normalize(x, kind)


def build_student(meta: Mapping[str, Any], quant: Any = None
                  ) -> students.Student:
  """The student described by a student.json dict (optionally quantised)."""
  return students.build(meta["name"], embed_dim=int(meta["embed_dim"]),
                        quant=quant, **dict(meta.get("overrides") or {}))


def save_student(workdir: str, *, meta: Mapping[str, Any], params: Any,
                 model_state: Mapping[str, Any] | None = None) -> None:
  """Writes student_params.msgpack (+ student_state.msgpack), then
  student.json (process 0).

  Each file is written atomically; the arrays come first, so a student.json
  always describes arrays that are complete on disk. model_state: the
  student's other collections (BatchNorm's 'batch_stats'); {} or None for
  students without.
  """
  host = jax.tree.map(np.asarray, jax.device_get(params))
  state = jax.tree.map(np.asarray, jax.device_get(dict(model_state or {})))
  if jax.process_index() != 0:
    return
  io.atomic_write_bytes(os.path.join(workdir, STUDENT_PARAMS),
                        flax.serialization.msgpack_serialize(host))
  state_file = os.path.join(workdir, STUDENT_STATE)
  if state:
    io.atomic_write_bytes(state_file,
                          flax.serialization.msgpack_serialize(state))
  elif os.path.exists(state_file):
    os.remove(state_file)
  io.atomic_write_json(os.path.join(workdir, STUDENT_FILE),
                       {**dict(meta), "model_state": sorted(state)})


def load_student(path: str, quant: Any = None
                 ) -> tuple[students.Student, Any, dict[str, Any]]:
  """(model, params, meta) of a student saved by `save_student`."""
  path = os.fspath(path)
  meta_file = os.path.join(path, STUDENT_FILE)
  params_file = os.path.join(path, STUDENT_PARAMS)
  if not (os.path.exists(meta_file) and os.path.exists(params_file)):
    raise ValueError(
        f"{path!r} holds no trained student ({STUDENT_FILE} and "
        f"{STUDENT_PARAMS}); point init_from/student at the workdir of a "
        "finished dual_modality_kd or qat_contrastive run.")
  meta = io.read_json(
      meta_file, required=("name", "embed_dim"),
      fix="re-run the stage that wrote it (dual_modality_kd or "
      "qat_contrastive)")
  params = _read_tree(params_file, "student params")
  return build_student(meta, quant), params, meta


def _read_tree(path: str, what: str) -> Any:
  """A msgpack tree of finite arrays, or a ValueError naming the file."""
  with open(path, "rb") as f:
    blob = f.read()
  try:
    tree = flax.serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises several types for a cut file.
    raise ValueError(
        f"{path} is truncated or corrupt ({len(blob)} bytes; "
        f"{type(e).__name__}: {e}); re-run the stage that wrote it.") from e
  flat = flax.traverse_util.flatten_dict(tree, sep="/") if isinstance(
      tree, dict) else {}
  finite.require_finite(
      flat, where=f"{what} {path!r}",
      fix="training diverged before this checkpoint was saved; re-run the "
      "stage (e.g. with a lower learning rate) or use an earlier workdir")
  return jax.tree.map(jnp.asarray, tree)


def load_student_state(path: str, meta: Mapping[str, Any]) -> dict[str, Any]:
  """The student's non-param collections ({} for students without)."""
  expected = list(meta.get("model_state") or [])
  state_file = os.path.join(os.fspath(path), STUDENT_STATE)
  if not expected:
    return {}
  if not os.path.exists(state_file):
    raise ValueError(
        f"{os.fspath(path)!r}: student.json lists collections {expected} but "
        f"{STUDENT_STATE} is missing; re-run the stage that wrote it.")
  return dict(_read_tree(state_file, "student state"))


def student_variables(path: str, quant: Any = None
                      ) -> tuple[students.Student, dict[str, Any],
                                 dict[str, Any]]:
  """(model, {'params', + 'batch_stats' etc.}, meta) of a saved student."""
  model, params, meta = load_student(path, quant)
  return model, {"params": params, **load_student_state(path, meta)}, meta


def tree_nbytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` as stored."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
