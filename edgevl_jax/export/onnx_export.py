"""ONNX edge artefact of a student: fp32 and int8 (two encodings) graphs.

    model = onnx_export.student_onnx(meta, variables)            # fp32
    model = onnx_export.student_onnx(meta, served, encoding="u8")  # int8
    manifest = onnx_export.export_onnx(out_dir, meta=meta, params=params,
                                       served=served, text_features=text,
                                       class_names=names)

Every graph maps images (B, S, S, 3) float32 in [0, 1] (NHWC, as the JAX
artefact; normalisation inside) to `embedding` (B, D), L2-normalised. The
int8 graphs are written from the converted static int8 student (its codes,
per-channel steps and calibrated ranges; see onnx_graph.py), never
re-quantised by ONNX Runtime's quantiser.

Folder (FILES): student_fp32.onnx, student_int8_s8s8.onnx (TensorRT, ARM
dot-product, VNNI), student_int8_u8.onnx (x86 AVX2 without VNNI),
text_features.npy ((C, D) unit rows), manifest.json (format, image size,
class names, logit scale, per-file bytes and sha256). `edge_predict` reads it
with onnxruntime and numpy only.

New families: add `FAMILIES[BackboneClass] = writer(g, w, module, x,
image_size) -> pooled name` (see onnx_transformers.py / onnx_cnns.py /
onnx_ghostnet.py).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper

from edgevl_jax.export import edge_predict
from edgevl_jax.export import onnx_cnns
from edgevl_jax.export import onnx_dat
from edgevl_jax.export import onnx_ghostnet
from edgevl_jax.export import onnx_graph
from edgevl_jax.export import onnx_transformers
from edgevl_jax.export.onnx_graph import Graph
from edgevl_jax.export.onnx_weights import Weights
from edgevl_jax.models import dat
from edgevl_jax.models import ghostnet
from edgevl_jax.models import mobilenet
from edgevl_jax.models import preprocess
from edgevl_jax.models import resnet
from edgevl_jax.models import students
from edgevl_jax.models import swin
from edgevl_jax.models import vit
from edgevl_jax.utils import io as io_lib

FORMAT = "edgevl_jax.onnx/1"
MANIFEST = "manifest.json"
TEXT_FEATURES = "text_features.npy"
FILES = {"fp32": "student_fp32.onnx", "int8_s8s8": "student_int8_s8s8.onnx",
         "int8_u8": "student_int8_u8.onnx"}

Writer = Callable[..., str]
FAMILIES: dict[type, Writer] = {
    vit.ViT: lambda g, w, m, x, size: onnx_transformers.vit(g, w, m, x),
    swin.Swin: onnx_transformers.swin,
    resnet.ResNet: onnx_cnns.resnet,
    mobilenet.MobileNetV2: onnx_cnns.mobilenet_v2,
    ghostnet.GhostNetV3: onnx_ghostnet.ghostnet_v3,
    dat.DAT: onnx_dat.dat,
}


def _student(meta: Mapping[str, Any]) -> students.Student:
  return students.build(meta["name"], embed_dim=int(meta["embed_dim"]),
                        **dict(meta.get("overrides") or {}))


def student_onnx(meta: Mapping[str, Any], variables: Mapping[str, Any], *,
                 encoding: str | None = None) -> onnx.ModelProto:
  """The ONNX graph of a student.

  Args:
    meta: student.json dict (name, embed_dim, overrides, normalization).
    variables: fp32 {'params', ['batch_stats']} for encoding None, or the
      served static int8 variables of `quant.convert` for 's8s8' / 'u8'.
    encoding: None (fp32), 's8s8' or 'u8' (onnx_graph.ENCODINGS).

  Returns:
    A checked ModelProto: images (B, S, S, 3) -> embedding (B, D).
  """
  model = _student(meta)
  backbone = model.backbone
  writer = FAMILIES.get(type(backbone))
  if writer is None:
    raise ValueError(
        f"no ONNX writer for student {meta['name']!r} "
        f"({type(backbone).__name__}); supported: "
        f"{sorted(c.__name__ for c in FAMILIES)}. Add one to "
        "edgevl_jax.export.onnx_export.FAMILIES.")
  w = Weights(variables)
  if encoding is not None and not w.quantised:
    raise ValueError("an int8 ONNX graph needs the served variables of "
                     "quant.convert (static int8), found float variables.")
  size = int(backbone.image_size)
  g = Graph(meta["name"], encoding)
  mean, std = preprocess._STATS[meta["normalization"]]  # pylint: disable=protected-access
  x = g.op("Div", g.op("Sub", "images", g.const(np.asarray(
      mean, np.float32))), g.const(np.asarray(std, np.float32)))
  pooled = writer(g, w, backbone, g.transpose(x, (0, 3, 1, 2)), size)
  emb = g.dense(pooled, w.layer("head/proj"))
  if model.head_layer_norm:
    emb = g.layer_norm(emb, w.param("head/norm/scale"),
                       w.param("head/norm/bias"), 1e-5)
  norm = g.op("ReduceL2", emb, g.ints([-1]), keepdims=1)
  g.nodes.append(helper.make_node("Div", [emb, norm], ["embedding"],
                                  name="embedding"))
  d = int(meta["embed_dim"])
  proto = g.model(
      [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                     ["batch", size, size, 3])],
      [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                     ["batch", d])],
      doc=f"edgevl_jax {meta['name']} student, "
          f"{encoding or 'fp32'}: images [0,1] NHWC -> unit embedding")
  onnx.checker.check_model(proto)
  return proto


sha256 = edge_predict.sha256


def export_onnx(
    out_dir: str,
    *,
    meta: Mapping[str, Any],
    params: Mapping[str, Any],
    served: Mapping[str, Any],
    text_features: Any,
    class_names: Sequence[str],
    logit_scale: float = 100.0,
    served_bytes: int | None = None,
) -> dict[str, Any]:
  """Writes the ONNX artefact folder (see module doc); returns the manifest.

  Args:
    out_dir: folder to create (files replaced atomically).
    meta: student.json dict.
    params: fp32 variables {'params', ['batch_stats']} of the student.
    served: `quant.convert` output of the static-calibrated student.
    text_features: (C, D) class text embeddings (normalised again here).
    class_names: the C names, rows of `text_features`.
    logit_scale: CLIP's scale of the cosines before the softmax.
    served_bytes: bytes of the served int8 pytree, recorded beside the
      ONNX file sizes.
  """
  text = np.asarray(text_features, np.float32)
  if text.ndim != 2 or text.shape != (len(class_names), int(meta["embed_dim"])):
    raise ValueError(
        f"text_features must be (len(class_names), embed_dim) = "
        f"({len(class_names)}, {meta['embed_dim']}); found {text.shape}.")
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  os.makedirs(out_dir, exist_ok=True)
  models = {"fp32": student_onnx(meta, params),
            "int8_s8s8": student_onnx(meta, served, encoding="s8s8"),
            "int8_u8": student_onnx(meta, served, encoding="u8")}
  files = {}
  for kind, model in models.items():
    path = os.path.join(out_dir, FILES[kind])
    io_lib.atomic_write_bytes(path, model.SerializeToString())
    files[FILES[kind]] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
  with io_lib.atomic_path(os.path.join(out_dir, TEXT_FEATURES)) as tmp:
    np.save(tmp, text)
  path = os.path.join(out_dir, TEXT_FEATURES)
  files[TEXT_FEATURES] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
  mean, std = preprocess._STATS[meta["normalization"]]  # pylint: disable=protected-access
  manifest = {
      "format": FORMAT,
      "student": dict(meta),
      "image_size": int(_student(meta).backbone.image_size),
      "input": {"name": "images", "layout": "NHWC", "channels": 3,
                "dtype": "float32", "range": [0.0, 1.0],
                "normalization": meta["normalization"], "mean": list(mean),
                "std": list(std)},
      "output": {"name": "embedding", "embedding": "L2-normalised",
                 "embed_dim": int(text.shape[1])},
      "models": dict(FILES),
      "encodings": {"int8_s8s8": "int8 activations, zero point 0 (TensorRT, "
                                 "ARM dot-product, x86 VNNI)",
                    "int8_u8": "uint8 activations, zero point 128, the same "
                               "codes (x86 AVX2 without VNNI)"},
      "opset": onnx_graph.OPSET,
      "class_names": list(class_names),
      "text_features": {"file": TEXT_FEATURES, "shape": list(text.shape)},
      "logit_scale": float(logit_scale),
      "files": files,
      "bytes": {"onnx_fp32": files[FILES["fp32"]]["bytes"],
                "onnx_int8": files[FILES["int8_s8s8"]]["bytes"],
                "served_int8": served_bytes},
  }
  io_lib.atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
  return manifest
