"""The EdgeVL edge artefact: a `jax.export` int8 student + class text features.

A folder a device can run with JAX alone (no Flax model code, no text tower):

  student.jax.bin      `jax.export.Exported.serialize()` of
                       f(weights, images) -> (B, D) L2-normalised embeddings;
                       images (B, S, S, 3) float32 in [0, 1] (normalisation
                       is inside), batch dimension symbolic ('b') when the
                       student lowers with it, else one file per fixed batch
                       size (student_b{N}.jax.bin),
  weights.msgpack      the served variables of `quant.convert` (int8 kernels,
                       fp32 per-channel scales, static activation ranges, fp32
                       biases/norms) passed to the function as an INPUT, so
                       they stay int8 on disk (closing over them would embed
                       them as HLO constants next to their float copies),
  text_features.npy    (C, D) L2-normalised class prompt embeddings,
  manifest.json        format, image size, normalisation mean/std, class
                       names, logit scale, dtypes, byte sizes, batch sizes.

    manifest = artifact.export_artifact(out_dir, meta=meta, served=served,
                                        text_features=text, class_names=names)
    predict = artifact.load_artifact(out_dir)
    emb, classes = predict(images_uint8)      # (B, D), (B,)
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant
from edgevl_jax.edgevl import handoff
from edgevl_jax.export import edge_predict
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import preprocess
from edgevl_jax.utils import io as io_lib

FORMAT = "edgevl_jax.artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.msgpack"
TEXT_FEATURES = "text_features.npy"
SYMBOLIC_FILE = "student.jax.bin"
DEFAULT_BATCH_SIZES = (1, 8)


def _fixed_file(batch: int) -> str:
  return f"student_b{batch}.jax.bin"


def serving_fn(meta: Mapping[str, Any]):
  """f(served, images in [0, 1]) -> (B, D) unit-norm embeddings (traceable)."""
  model = handoff.build_student(
      meta, quant.int8(calibration="static").replace(phase="serve"))
  kind = meta["normalization"]

  def embed(served, images):
    x = preprocess.normalize(images.astype(jnp.float32), kind)
    emb = quant.serve_apply(model.apply, served, x)
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)

  return embed


def _export(fn, served_specs, image_spec, platforms):
  return jax.export.export(jax.jit(fn), platforms=platforms)(served_specs,
                                                             image_spec)


def export_artifact(
    out_dir: str,
    *,
    meta: Mapping[str, Any],
    served: Mapping[str, Any],
    text_features: Any,
    class_names: Sequence[str],
    logit_scale: float = 100.0,
    batch_sizes: Sequence[int] | None = None,
    platforms: Sequence[str] = ("cpu",),
    teacher_bytes: int | None = None,
) -> dict[str, Any]:
  """Writes the artefact folder; returns its manifest.

  Args:
    out_dir: folder to create (existing artefact files are replaced).
    meta: the student.json dict (name, embed_dim, overrides, normalization).
    served: `quant.convert` output of the static int8 student.
    text_features: (C, D) class text embeddings (normalised again here).
    class_names: C names, the row order of `text_features`.
    logit_scale: multiplier of the cosine similarities before the softmax
      that gives a confidence (CLIP's learnt scale, 100 in OpenAI CLIP).
    batch_sizes: None tries a symbolic batch dimension first and falls back
      to `DEFAULT_BATCH_SIZES`; a sequence forces those fixed sizes.
    platforms: lowering platforms ('cpu', 'cuda', 'tpu').
    teacher_bytes: fp32 bytes of the teacher image tower, for the size ratio.

  Returns:
    The manifest dict (also written to out_dir/manifest.json).
  """
  text = np.asarray(text_features, np.float32)
  if text.ndim != 2 or text.shape[0] != len(class_names):
    raise ValueError(
        f"text_features must be (num_classes, D) with num_classes = "
        f"len(class_names) = {len(class_names)}; found shape {text.shape}.")
  if text.shape[1] != int(meta["embed_dim"]):
    raise ValueError(
        f"text_features width {text.shape[1]} != student embed_dim "
        f"{meta['embed_dim']}; export text features of the student's teacher.")
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  host = jax.tree.map(np.asarray, jax.device_get(
      flax.core.unfreeze(flax.linen.meta.unbox(dict(served)))))
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
  image_size = int(handoff.build_student(meta).image_size)
  fn = serving_fn(meta)
  os.makedirs(out_dir, exist_ok=True)
  files, exported_batches = {}, None
  if batch_sizes is None:
    (b,) = jax.export.symbolic_shape("b")
    try:
      exp = _export(fn, specs, jax.ShapeDtypeStruct(
          (b, image_size, image_size, 3), jnp.float32), platforms)
    except Exception:  # pylint: disable=broad-except
      # Some lowering rules need static shapes: fixed batch sizes instead.
      batch_sizes = DEFAULT_BATCH_SIZES
    else:
      io_lib.atomic_write_bytes(os.path.join(out_dir, SYMBOLIC_FILE), exp.serialize())
      files["symbolic"] = SYMBOLIC_FILE
      exported_batches = "symbolic"
  if batch_sizes is not None:
    for batch in batch_sizes:
      if int(batch) < 1:
        raise ValueError(f"batch_sizes must be positive, found {batch}.")
      exp = _export(fn, specs, jax.ShapeDtypeStruct(
          (int(batch), image_size, image_size, 3), jnp.float32), platforms)
      io_lib.atomic_write_bytes(os.path.join(out_dir, _fixed_file(int(batch))),
                   exp.serialize())
      files[str(int(batch))] = _fixed_file(int(batch))
    exported_batches = [int(b) for b in batch_sizes]
  io_lib.atomic_write_bytes(os.path.join(out_dir, WEIGHTS),
               flax.serialization.msgpack_serialize(host))
  with io_lib.atomic_path(os.path.join(out_dir, TEXT_FEATURES)) as tmp:
    np.save(tmp, text)
  nbytes = quant.served_nbytes(host)
  sizes = {
      "weights_file": os.path.getsize(os.path.join(out_dir, WEIGHTS)),
      "int8_weights": nbytes["int_weights"],
      "scales": nbytes["scales"],
      "float_params": nbytes["float_params"],
      "student_int8": size_lib.model_size(host)["bytes"],
      "text_features": int(text.nbytes),
      "program_files": sum(os.path.getsize(os.path.join(out_dir, f))
                           for f in files.values()),
  }
  if teacher_bytes:
    sizes["teacher_fp32"] = int(teacher_bytes)
    sizes["compression_int8"] = teacher_bytes / sizes["student_int8"]
  mean, std = {"clip": (preprocess.CLIP_MEAN, preprocess.CLIP_STD),
               "imagenet": (preprocess.IMAGENET_MEAN,
                            preprocess.IMAGENET_STD)}[meta["normalization"]]
  manifest = {
      "format": FORMAT,
      "student": dict(meta),
      "image_size": image_size,
      "input": {"layout": "NHWC", "channels": 3, "dtype": "float32",
                "range": [0.0, 1.0], "normalization": meta["normalization"],
                "mean": list(mean), "std": list(std),
                "note": "uint8 images are divided by 255 by the loader"},
      "output": {"embedding": "L2-normalised", "dtype": "float32",
                 "embed_dim": int(text.shape[1])},
      "weights": {"file": WEIGHTS, "passed_as": "input",
                  "dtypes": sorted({str(a.dtype)
                                    for a in jax.tree.leaves(host)})},
      "programs": files,
      "batch_sizes": exported_batches,
      "platforms": list(platforms),
      "class_names": list(class_names),
      "text_features": {"file": TEXT_FEATURES, "shape": list(text.shape),
                        "dtype": "float32"},
      "logit_scale": float(logit_scale),
      "bytes": sizes,
  }
  io_lib.atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


def export_from_student(
    out_dir: str,
    *,
    meta: Mapping[str, Any],
    variables: Mapping[str, Any],
    text_features: Any,
    class_names: Sequence[str],
    **kwargs,
) -> dict[str, Any]:
  """Converts a static-calibrated student to int8 and exports it.

  Args:
    out_dir: artefact folder.
    meta: student.json dict.
    variables: {'params', 'quant_stats'} of the static-calibrated student
      (`edgevl.calibration.calibrated_variables`).
    text_features, class_names, **kwargs: as in `export_artifact`.
  """
  served = convert_static(meta, variables)
  return export_artifact(out_dir, meta=meta, served=served,
                         text_features=text_features, class_names=class_names,
                         **kwargs)


def convert_static(meta: Mapping[str, Any], variables: Mapping[str, Any]
                   ) -> dict[str, Any]:
  """The served int8 variables of a static-calibrated student (host numpy).

  Args:
    meta: student.json dict.
    variables: {'params', 'quant_stats'} (`calibration.calibrated_variables`).
  """
  if quant.QUANT_STATS not in variables:
    raise ValueError("export_from_student needs calibrated variables (a "
                     f"'{quant.QUANT_STATS}' collection); calibrate first.")
  spec = quant.int8(calibration="static")
  m_cvt = handoff.build_student(meta, spec.replace(phase="convert"))
  size = int(meta["image_size"])
  served = quant.convert(m_cvt.apply, dict(variables),
                         jnp.zeros((1, size, size, 3), jnp.float32))
  return jax.tree.map(np.asarray, jax.device_get(
      flax.core.unfreeze(flax.linen.meta.unbox(dict(served)))))


class Artifact(edge_predict.ZeroShotClassifier):
  """A loaded artefact: `artifact(images) -> (embeddings, classes)`.

  Attributes:
    manifest: the manifest dict.
    class_names: list of C names.
    text_features: (C, D) float32, unit rows.
    image_size: S of the expected (B, S, S, 3) input.
  """

  def __init__(self, manifest: dict[str, Any], programs: dict[Any, Any],
               weights: Any, text_features: np.ndarray):
    self.manifest = manifest
    self.class_names = list(manifest["class_names"])
    self.text_features = text_features
    self.image_size = int(manifest["image_size"])
    self._programs = programs
    self._weights = weights

  def embed(self, images: Any) -> np.ndarray:
    """images: (B, S, S, 3) uint8 in [0, 255] or float in [0, 1] -> (B, D)."""
    x = np.asarray(images)
    s = self.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError(f"images must be (B, {s}, {s}, 3) NHWC, found shape "
                       f"{x.shape}; resize to the artefact's image_size {s}.")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else (
        x.astype(np.float32))
    if "symbolic" in self._programs:
      return np.asarray(self._programs["symbolic"].call(self._weights, x))
    sizes = sorted(self._programs)
    out = []
    for start in range(0, x.shape[0], max(sizes)):
      chunk = x[start:start + max(sizes)]
      fit = next(b for b in sizes if b >= chunk.shape[0])
      pad = np.zeros((fit - chunk.shape[0],) + chunk.shape[1:], np.float32)
      emb = self._programs[fit].call(self._weights,
                                     np.concatenate([chunk, pad]))
      out.append(np.asarray(emb)[:chunk.shape[0]])
    return np.concatenate(out)



def load_artifact(path: str) -> Artifact:
  """Reads an artefact folder written by `export_artifact`.

  Every file is checked as it is read: a missing, truncated or mismatched
  manifest, program, weights or text-features file raises one ValueError
  naming it (and "re-export the artefact").
  """
  path = os.fspath(path)
  manifest_file = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_file):
    raise ValueError(
        f"{path!r} is not an edgevl_jax artefact (no {MANIFEST}); pass the "
        "folder written by edgevl_jax.export.artifact.export_artifact.")
  fix = "re-export the artefact"
  manifest = io_lib.read_json(manifest_file, fix=fix, required=("format",))
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{manifest_file} has format {manifest.get('format')!r}, "
                     f"expected {FORMAT!r}; re-export the artefact.")
  absent = [k for k in ("programs", "class_names", "image_size",
                        "logit_scale") if k not in manifest]
  if absent:
    raise ValueError(f"{manifest_file} has no {absent}; {fix}.")
  needed = [WEIGHTS, TEXT_FEATURES, *manifest["programs"].values()]
  missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(f"artefact {path!r} is missing {missing}; re-export it.")
  programs = {}
  for key, name in manifest["programs"].items():
    programs["symbolic" if key == "symbolic" else int(key)] = _read_file(
        os.path.join(path, name), "program (jax.export)",
        lambda blob: jax.export.deserialize(bytearray(blob)))
  weights = _read_file(os.path.join(path, WEIGHTS), "weights (msgpack)",
                       flax.serialization.msgpack_restore)
  text = _read_file(os.path.join(path, TEXT_FEATURES), "text features (.npy)",
                    lambda blob: np.load(io.BytesIO(blob)))
  text = np.asarray(text, np.float32)
  classes = len(manifest["class_names"])
  if text.ndim != 2 or text.shape[0] != classes:
    raise ValueError(
        f"{os.path.join(path, TEXT_FEATURES)} has shape {text.shape}, "
        f"expected ({classes}, D) for the {classes} class_names of "
        f"{manifest_file}; the files come from different exports, "
        "re-export the artefact.")
  for key, exp in programs.items():
    _check_weights_fit(exp, weights, text.shape[1],
                       os.path.join(path, manifest["programs"][str(key)]),
                       os.path.join(path, WEIGHTS))
  return Artifact(manifest, programs, weights, text)


def _read_file(file: str, what: str, parse):
  """parse(bytes of file); ValueError naming the file when it fails."""
  with open(file, "rb") as f:
    blob = f.read()
  try:
    return parse(blob)
  except Exception as e:  # each format raises its own types for a cut file.
    raise ValueError(
        f"{file}: the {what} file is truncated or corrupt ({len(blob)} bytes;"
        f" {type(e).__name__}: {str(e)[:200]}); re-export the artefact."
    ) from e


def _check_weights_fit(exp: Any, weights: Any, embed_dim: int,
                       program_file: str, weights_file: str) -> None:
  """The weights' leaves are the program's inputs (shape and dtype)."""
  leaves = jax.tree.leaves(weights)
  avals = list(exp.in_avals)[:-1]  # the last input is the image batch
  problem = None
  if len(leaves) != len(avals):
    problem = f"{len(leaves)} arrays, the program takes {len(avals)}"
  else:
    for i, (leaf, aval) in enumerate(zip(leaves, avals)):
      leaf = np.asarray(leaf)
      if leaf.shape != tuple(aval.shape) or leaf.dtype != aval.dtype:
        problem = (f"array {i} is {leaf.dtype}{list(leaf.shape)}, the "
                   f"program expects {aval.dtype}{list(aval.shape)}")
        break
  out = list(exp.out_avals)
  if problem is None and out and out[0].shape[-1] != embed_dim:
    problem = (f"the program returns {out[0].shape[-1]}-dim embeddings but "
               f"text_features.npy has {embed_dim} columns")
  if problem:
    raise ValueError(
        f"{weights_file} does not fit {program_file}: {problem}; the files "
        "come from different exports, re-export the artefact.")
