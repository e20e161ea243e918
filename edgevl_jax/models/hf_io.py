"""Reading a local Hugging Face model folder: one reader for every family.

    cfg = hf_io.read_config(path, what="student checkpoint",
                            model_types=("vit", "swin"), fix="...")
    state = hf_io.read_state_dict(path, what="student checkpoint")
    hf_io.match_tensors(state, {name: torch_shape}, where=..., model=...)
    kernel = hf_io.torch_to_flax(state[name], "kernel")

A folder holds config.json and the weights: model.safetensors, or
model.safetensors.index.json plus every shard its weight_map lists, or
pytorch_model.bin (a PyTorch pickle; reading it needs torch). Used by the
CLIP teacher (clip/convert.py) and the student families (vit, swin, resnet,
mobilenet), so a bad folder gets the same message whichever model reads it:
the folder, the file, what is wrong and what to do.

A missing file raises `MissingFileError` and a missing torch
`MissingDependencyError`; both are also ValueErrors, the "bad input" that
job validation turns into a usage error.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy

from edgevl_jax.utils import finite
from edgevl_jax.utils import io

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
WEIGHT_FILES = f"{SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}"

# Flax leaf -> the name of the PyTorch tensor it holds; other leaves
# (bias, cls_token, class_embedding, ...) keep their name.
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight",
              "mean": "running_mean", "var": "running_var"}


class MissingFileError(FileNotFoundError, ValueError):
  """A folder or file the checkpoint needs is absent."""


class MissingDependencyError(ImportError, ValueError):
  """Reading the checkpoint needs a package that is not installed."""


def read_config(path: str | os.PathLike[str], *, what: str,
                model_types: Sequence[str], fix: str) -> dict[str, Any]:
  """config.json of folder `path`, its model_type one of `model_types`.

  Args:
    path: the folder.
    what: names the checkpoint in messages, e.g. "CLIP checkpoint".
    model_types: accepted `model_type` values.
    fix: what to do about a missing or unreadable folder or config.json.

  Raises:
    MissingFileError: no folder or no config.json.
    ValueError: config.json is not a JSON object, or has another model_type.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise MissingFileError(f"{what} folder {path!r} does not exist; {fix}.")
  cfg_file = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_file):
    raise MissingFileError(f"{what} folder {path!r}: {cfg_file} not found; "
                           f"{fix}.")
  cfg = io.read_json(cfg_file, fix=fix)
  model_type = cfg.get("model_type")
  if model_type not in model_types:
    kinds = "that type" if len(model_types) == 1 else "one of those types"
    raise ValueError(
        f"{cfg_file} has model_type={model_type!r}, expected "
        f"{' or '.join(map(repr, sorted(model_types)))}; a {what} folder "
        f"holds a Hugging Face model of {kinds}.")
  return cfg


def require_values(cfg: Mapping[str, Any], path: str,
                   **allowed: Sequence[Any]) -> None:
  """Raises ValueError unless each cfg[key] (default: the first allowed
  value) is one of `allowed[key]`, e.g. `hidden_act=('gelu',)`."""
  for key, values in allowed.items():
    value = cfg.get(key, values[0])
    if value not in values:
      raise ValueError(
          f"{path}/{CONFIG}: {key}={value!r} is not supported by the "
          f"student (supported: {tuple(values)}).")


def square_size(cfg: Mapping[str, Any], key: str, path: str) -> int:
  """cfg[key] as one int; a [h, w] pair must be square."""
  value = cfg[key]
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{path}/{CONFIG}: {key}={value} is not square; "
                       "the students take square sizes.")
    value = value[0]
  return int(value)


def weight_files(path: str) -> tuple[str | None, list[str]]:
  """(kind, files) of a folder's weights, (None, []) when it has none.

  `kind` is SAFETENSORS, SAFETENSORS_INDEX (files: every shard) or
  TORCH_BIN, in that order of preference.

  Raises:
    ValueError: the sharded index is unreadable, has no weight_map, or lists
      shards that are missing.
  """
  single = os.path.join(path, SAFETENSORS)
  index = os.path.join(path, SAFETENSORS_INDEX)
  binary = os.path.join(path, TORCH_BIN)
  if os.path.isfile(single):
    return SAFETENSORS, [single]
  if os.path.isfile(index):
    weight_map = io.read_json(
        index, required=("weight_map",),
        fix="re-save the sharded checkpoint with save_pretrained")["weight_map"]
    files = sorted({os.path.join(path, f) for f in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise MissingFileError(
          f"shard(s) {missing} listed in {index} are missing; copy every "
          "shard of the checkpoint.")
    return SAFETENSORS_INDEX, files
  if os.path.isfile(binary):
    return TORCH_BIN, [binary]
  return None, []


def read_state_dict(path: str | os.PathLike[str], *,
                    what: str) -> dict[str, np.ndarray]:
  """Every tensor of folder `path` as float32 numpy, checked to be finite.

  Raises:
    MissingFileError: no weight file, or a listed shard is missing.
    MissingDependencyError: pytorch_model.bin without torch installed.
    ValueError: a truncated or corrupt file, or NaN / inf values (naming
      each tensor).
  """
  path = os.fspath(path)
  kind, files = weight_files(path)
  if kind is None:
    raise MissingFileError(
        f"{what} folder {path!r} has no weight file (no {WEIGHT_FILES}; "
        f"files there: {sorted(os.listdir(path))}); pass a Hugging Face "
        "model folder saved with save_pretrained.")
  state = {}
  for file in files:
    state.update(_read_torch_bin(file) if kind == TORCH_BIN
                 else _read_safetensors(file))
  finite.require_finite(
      state, where=f"{what} {path!r}",
      fix="the checkpoint is corrupt or was saved after training diverged; "
      "re-copy it or use another checkpoint")
  return state


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  try:
    state = safetensors.numpy.load_file(file)
  except Exception as e:  # safetensors raises its own Rust-side error types.
    raise ValueError(
        f"could not read {file}: it is truncated or corrupt "
        f"({type(e).__name__}: {e}); re-save or re-copy the checkpoint."
    ) from e
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
  try:
    # torch is optional (seconds to import, only for .bin checkpoints).
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError(
        f"{file} is a PyTorch pickle and reading it needs torch, which is "
        "not installed; `pip install torch` or convert the checkpoint to "
        f"{SAFETENSORS}.") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a bad pickle.
    raise ValueError(f"could not read PyTorch checkpoint {file} "
                     f"({type(e).__name__}: {e}); re-copy it.") from e
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def safetensors_problem(file: str) -> str | None:
  """Why `file` is not a complete safetensors file (header only), or None.

  The format is an 8-byte little-endian header length, a JSON header giving
  each tensor's byte range, then the data; a copy cut short is shorter than
  the largest range end.
  """
  size = os.path.getsize(file)
  if size < 8:
    return f"{file} is truncated ({size} bytes; re-copy the checkpoint)"
  with open(file, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
      return (f"{file} is truncated or not a safetensors file (header of "
              f"{header_len} bytes in a {size}-byte file); re-copy it")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
      return f"{file} has a corrupt safetensors header; re-copy it"
  ends = [int(v["data_offsets"][1]) for k, v in header.items()
          if k != "__metadata__" and isinstance(v, dict)
          and "data_offsets" in v]
  want = 8 + header_len + max(ends, default=0)
  if size < want:
    return (f"{file} is truncated ({size} bytes, its header needs {want}); "
            "re-copy the checkpoint")
  return None


def torch_to_flax(x: np.ndarray, leaf: str) -> np.ndarray:
  """One PyTorch tensor in the layout of the Flax leaf it becomes.

  Linear weight (out, in) -> Dense kernel (in, out); Conv2d weight
  (O, I, kh, kw) -> Conv kernel (kh, kw, I, O) (depthwise: I == 1, Flax's
  layout for feature_group_count == channels); every other tensor as is.
  """
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x


def flax_to_torch(x: np.ndarray, leaf: str) -> np.ndarray:
  """The inverse of `torch_to_flax`."""
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x


def torch_shape(flax_shape: Sequence[int], leaf: str) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf of `flax_shape` (no memory used)."""
  view = np.broadcast_to(np.zeros((), np.bool_), tuple(flax_shape))
  return tuple(flax_to_torch(view, leaf).shape)


def _some(names: list[str], n: int = 8) -> str:
  """The first n names and how many more, for readable errors."""
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return f"{names[:n]}{more} ({len(names)} in all)"


def match_tensors(state: Mapping[str, Any],
                  wanted: Mapping[str, tuple[int, ...]], *, where: str,
                  model: str) -> None:
  """Raises ValueError unless `state` holds exactly `wanted` (name -> shape).

  Args:
    state: HF tensor name -> array, ignored names already dropped.
    wanted: HF tensor name -> PyTorch shape the model built from config.json
      needs.
    where: the folder, for the message.
    model: what was built, e.g. "vit student", "CLIP model".

  Raises:
    ValueError: naming every missing and unexpected tensor and each tensor
      whose shape differs (found and expected).
  """
  missing = sorted(set(wanted) - set(state))
  unexpected = sorted(set(state) - set(wanted))
  shapes = [f"tensor {name!r} has shape {tuple(np.shape(state[name]))}, "
            f"expected {tuple(wanted[name])}" for name in sorted(wanted)
            if name in state and tuple(np.shape(state[name])) != tuple(
                wanted[name])]
  problems = ([f"missing tensors {_some(missing)}"] if missing else []) + (
      [f"unexpected tensors {_some(unexpected)}"] if unexpected else []) + (
          shapes[:8] + ([f"{len(shapes) - 8} more mis-shaped tensors"]
                        if len(shapes) > 8 else []))
  if problems:
    raise ValueError(
        f"{where}: checkpoint does not match the {model} built from its "
        f"{CONFIG}: " + "; ".join(problems) + f". {CONFIG} and the weights "
        "disagree; check that config.json belongs to these weights.")
