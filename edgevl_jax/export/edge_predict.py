"""Runs the ONNX edge artefact with ONNX Runtime (or OpenVINO): no JAX.

A device needs onnxruntime, numpy and pillow only (`pip install
edgevl_jax[edge]`); nothing here imports jax, flax or the model code.

    model = edge_predict.load(folder, model="int8_u8")
    emb, classes = model(images_uint8)        # (B, D) unit rows, (B,)

Every file is checked when loaded: a missing file, a file whose sha256 is
not the manifest's (truncated or replaced), or an image batch of the wrong
size or channel count raises one ValueError naming the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

FORMAT = "edgevl_jax.onnx/1"
MANIFEST = "manifest.json"
MODELS = ("int8_u8", "int8_s8s8", "fp32")
RUNTIMES = ("onnxruntime", "openvino")


def is_onnx_artifact(folder: str) -> bool:
  """True when `folder` holds an ONNX artefact manifest."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def sha256(path: str) -> str:
  """Hex sha256 of a file (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_manifest(folder: str) -> dict[str, Any]:
  """The manifest of an ONNX artefact folder, checked for its keys."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"{folder!r} is not an edgevl_jax ONNX artefact (no "
                     f"{MANIFEST}); pass the export_onnx folder.")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-export the "
                     "artefact.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not an {FORMAT} manifest; re-export the "
                     "artefact.")
  absent = [k for k in ("models", "files", "image_size", "class_names",
                        "text_features", "logit_scale") if k not in manifest]
  if absent:
    raise ValueError(f"{path} has no {absent}; re-export the artefact.")
  return manifest


def checked_file(folder: str, manifest: dict[str, Any], name: str) -> str:
  """Path of artefact file `name` after its existence and sha256 check."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise ValueError(f"artefact {folder!r} is missing {name}; re-export it "
                     "(copy the whole folder).")
  want = manifest["files"].get(name, {})
  size = os.path.getsize(path)
  if want.get("sha256") and sha256(path) != want["sha256"]:
    raise ValueError(
        f"{path}: sha256 does not match the manifest ({size} bytes, expected "
        f"{want.get('bytes')}); the file is truncated or from another "
        "export, copy it again or re-export the artefact.")
  return path


class ZeroShotClassifier:
  """Zero-shot classes from `embed` and the artefact's text features; the
  base of both artefact kinds (this module's and `artifact.Artifact`).
  Subclasses set `manifest`, `text_features` and define `embed`."""

  manifest: dict
  text_features: np.ndarray

  def embed(self, images: Any) -> np.ndarray:
    raise NotImplementedError

  def scores(self, embeddings: np.ndarray) -> np.ndarray:
    """(B, D) -> (B, C) class probabilities (softmax of scaled cosines)."""
    logits = self.manifest["logit_scale"] * embeddings @ self.text_features.T
    logits = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)

  def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """images -> ((B, D) embeddings, (B,) class ids)."""
    emb = self.embed(images)
    return emb, np.argmax(emb @ self.text_features.T, axis=-1)


class EdgeModel(ZeroShotClassifier):
  """A loaded ONNX artefact: `model(images) -> (embeddings, classes)`.

  Attributes:
    manifest: the manifest dict.
    class_names: C names; text_features: (C, D) float32 unit rows.
    image_size: S of the (B, S, S, 3) input.
  """

  def __init__(self, folder: str, *, model: str = "int8_u8",
               runtime: str = "onnxruntime", threads: int | None = None):
    if model not in MODELS:
      raise ValueError(f"model={model!r}: choose one of {MODELS}.")
    if runtime not in RUNTIMES:
      raise ValueError(f"runtime={runtime!r}: choose one of {RUNTIMES}.")
    self.manifest = manifest = read_manifest(folder)
    self.class_names = list(manifest["class_names"])
    self.image_size = int(manifest["image_size"])
    onnx_file = checked_file(folder, manifest, manifest["models"][model])
    text_file = checked_file(folder, manifest,
                             manifest["text_features"]["file"])
    text = np.load(text_file).astype(np.float32)
    if text.ndim != 2 or text.shape[0] != len(self.class_names):
      raise ValueError(f"{text_file} has shape {text.shape}, expected "
                       f"({len(self.class_names)}, D); re-export the "
                       "artefact.")
    self.text_features = text
    self._run = (_openvino(onnx_file, threads) if runtime == "openvino"
                 else _onnxruntime(onnx_file, threads))

  def embed(self, images: Any) -> np.ndarray:
    """images (B, S, S, 3) uint8 [0, 255] or float [0, 1] -> (B, D)."""
    x = np.asarray(images)
    s = self.image_size
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"images must be (B, {s}, {s}, 3) NHWC RGB, found shape "
                       f"{x.shape}: wrong channel count or layout; repeat "
                       "single-channel images to 3 channels, channels last.")
    if x.shape[1:3] != (s, s):
      raise ValueError(f"images must be (B, {s}, {s}, 3), found shape "
                       f"{x.shape}: wrong image size; resize to {s}x{s}.")
    x = (x.astype(np.float32) / 255.0 if x.dtype == np.uint8
         else x.astype(np.float32))
    return self._run(np.ascontiguousarray(x))



def _onnxruntime(path: str, threads: int | None):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  if threads:
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
  try:
    session = ort.InferenceSession(path, opts,
                                   providers=["CPUExecutionProvider"])
  except Exception as e:  # ORT raises its own types for a corrupt model.
    raise ValueError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}"
                     f": {str(e)[:200]}); re-export the artefact.") from e
  return lambda x: session.run(["embedding"], {"images": x})[0]


def _openvino(path: str, threads: int | None):
  try:
    import openvino as ov  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("runtime='openvino' needs the openvino package (pip "
                     "install openvino); or use runtime='onnxruntime'.") from e
  core = ov.Core()
  # f32: OpenVINO may otherwise run the float parts in bf16 on CPUs with it.
  config = {"INFERENCE_PRECISION_HINT": "f32"}
  if threads:
    config["INFERENCE_NUM_THREADS"] = int(threads)
  compiled = core.compile_model(core.read_model(path), "CPU", config)
  request = compiled.create_infer_request()

  def run(x):
    return np.asarray(request.infer({"images": x})["embedding"]).copy()

  return run


def load(folder: str, **kwargs) -> EdgeModel:
  """`EdgeModel(folder, **kwargs)`."""
  return EdgeModel(folder, **kwargs)
