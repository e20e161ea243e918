"""Hugging Face CLIP checkpoints <-> Flax `CLIP` params.

The Flax tree uses HF's names, so the conversion of each tensor is:
  `encoder.layers.{i}`  <->  `encoder/layers_{i}`
  Linear `weight` (out, in)            <->  Dense `kernel` (in, out): transpose
  Conv2d `weight` (out, in, kh, kw)    <->  Conv `kernel` (kh, kw, in, out)
  LayerNorm `weight`                   <->  `scale`
  Embedding `weight`                   <->  `embedding`
  `class_embedding`, `logit_scale`, `bias`: unchanged.
`position_ids` buffers in old checkpoints are ignored. Everything else must
match exactly: a missing, unexpected or mis-shaped tensor is an error.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.utils import finite
from edgevl_jax.utils import jsonio

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"


def _hf_key(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax param path -> (HF tensor name, kind of transform)."""
  parts = []
  for p in path[:-1]:
    if p.startswith("layers_") and p[len("layers_"):].isdigit():
      parts += ["layers", p[len("layers_"):]]
    else:
      parts.append(p)
  leaf = path[-1]
  leaf_name = {"kernel": "weight", "scale": "weight",
               "embedding": "weight"}.get(leaf, leaf)
  return ".".join(parts + [leaf_name]), leaf


def _to_hf_array(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x


def _from_hf_array(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 2:
    return x.T
  if leaf == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x


def params_from_hf(state: Mapping[str, np.ndarray], model: Any) -> dict:
  """Converts an HF `CLIPModel` state dict to float32 params of `model`.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped tensor with
      its expected and found shape (HF layout).
  """
  from edgevl_jax.models import clip  # pylint: disable=g-import-not-at-top

  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: clip.init_params(model, jax.random.key(0))))
  problems, flat = [], {}
  used = set()
  for path, shape_struct in expected.items():
    name, leaf = _hf_key(path)
    want = tuple(_to_hf_array(np.empty(shape_struct.shape, np.bool_),
                              leaf).shape)
    if name not in state:
      problems.append(f"missing tensor {name!r} (expected shape {want})")
      continue
    used.add(name)
    found = tuple(np.shape(state[name]))
    if found != want:
      problems.append(f"tensor {name!r}: expected shape {want}, found "
                      f"shape {found}")
      continue
    flat[path] = np.asarray(_from_hf_array(np.asarray(state[name]), leaf),
                            np.float32)
  unexpected = sorted(k for k in state
                      if k not in used and not k.endswith("position_ids"))
  problems += [f"unexpected tensor {k!r} (shape {tuple(np.shape(state[k]))})"
               for k in unexpected]
  if problems:
    raise ValueError(
        f"CLIP checkpoint does not match its config ({len(problems)} "
        "problems): " + "; ".join(problems[:20])
        + ("; ..." if len(problems) > 20 else "")
        + ". Check that config.json belongs to these weights.")
  return flax.traverse_util.unflatten_dict(flat)


def params_to_hf(params: Any) -> dict[str, np.ndarray]:
  """Flax params -> HF `CLIPModel` state dict (float32, contiguous)."""
  out = {}
  for path, x in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(params)).items():
    name, leaf = _hf_key(tuple(path))
    x = np.asarray(jax.device_get(x), np.float32)
    out[name] = np.array(_to_hf_array(x, leaf), order="C")  # keeps 0-d
  return out


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  try:
    return safetensors.numpy.load_file(file)
  except Exception as e:  # safetensors raises its own Rust-side error types.
    raise ValueError(
        f"could not read safetensors file {file!r}: it is truncated or "
        f"corrupt ({type(e).__name__}: {e}); re-save or re-copy the "
        "checkpoint.") from e


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{file!r} is a PyTorch pickle and reading it needs torch, which is "
        "not installed; `pip install torch` or convert the checkpoint to "
        "model.safetensors.") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a bad pickle.
    raise ValueError(f"could not read PyTorch checkpoint {file!r}: "
                     f"{type(e).__name__}: {e}") from e
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of an HF folder: model.safetensors (or its sharded index) or
  pytorch_model.bin, in that order of preference."""
  single = os.path.join(path, _SAFETENSORS)
  index = os.path.join(path, _SAFETENSORS_INDEX)
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    weight_map = jsonio.read_json(
        index, required=("weight_map",),
        fix="re-save the sharded checkpoint with save_pretrained")["weight_map"]
    shards = sorted(set(weight_map.values()))
    state = {}
    for shard in shards:
      shard_file = os.path.join(path, shard)
      if not os.path.isfile(shard_file):
        raise FileNotFoundError(
            f"CLIP checkpoint: shard {shard_file!r} listed in {index!r} is "
            "missing; copy every shard of the checkpoint.")
      state.update(_read_safetensors(shard_file))
    return state
  binary = os.path.join(path, _TORCH_BIN)
  if os.path.isfile(binary):
    return _read_torch_bin(binary)
  raise FileNotFoundError(
      f"CLIP checkpoint folder {path!r} has no weight file: expected "
      f"{_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_TORCH_BIN}, found "
      f"{sorted(os.listdir(path))}.")


def load_config(path: str) -> Any:
  """The `transformers.CLIPConfig` of an HF folder, checked to be CLIP."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"CLIP checkpoint folder {path!r} does not exist; pass a local "
        "Hugging Face CLIP folder (config.json plus model.safetensors or "
        "pytorch_model.bin).")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
        f"CLIP checkpoint folder {path!r} has no config.json; save the "
        "model with CLIPModel.save_pretrained or save_pretrained here.")
  model_type = jsonio.read_json(
      config_file, fix="re-save the model with CLIPModel.save_pretrained "
      "(or clip.save_pretrained)").get("model_type")
  if model_type != "clip":
    raise ValueError(
        f"{config_file!r} has model_type={model_type!r}, expected 'clip'; "
        "this loader reads Hugging Face CLIPModel checkpoints only.")
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.CLIPConfig.from_pretrained(path, local_files_only=True)


def load_pretrained(path: str | os.PathLike[str], *,
                    dtype: Any = jnp.float32, ops: Any = None
                    ) -> tuple[Any, dict]:
  """Loads a local HF CLIP folder as a Flax `CLIP` and float32 params.

  Args:
    path: folder with config.json and model.safetensors (or a sharded
      model.safetensors.index.json, or pytorch_model.bin, which needs torch).
    dtype: compute dtype of the returned model (params stay float32).
    ops: optional `layers.Ops` (e.g. AQT); default plain lax.

  Returns:
    (model, params) for `model.apply({'params': params}, ...)`.
  """
  from edgevl_jax.models import clip, layers  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  config = load_config(path)
  model = clip.CLIP(config=config, dtype=dtype, ops=ops or layers.Ops())
  state = read_state_dict(path)
  finite.require_finite(
      state, where=f"CLIP checkpoint {path!r}",
      fix="the checkpoint is corrupt or was saved after training diverged; "
      "re-copy it or use an earlier checkpoint")
  return model, params_from_hf(state, model)


def save_pretrained(path: str | os.PathLike[str], model: Any,
                    params: Any) -> str:
  """Writes config.json + model.safetensors that HF `CLIPModel` loads.

  Files are written to temporaries and renamed, so an interrupted save never
  leaves a half-written checkpoint. Returns `path`.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = params_to_hf(params)
  params_from_hf(tensors, model)  # refuse params that do not fit the config
  config = model.config.to_hf()
  with tempfile.TemporaryDirectory(dir=path) as tmp:
    config.save_pretrained(tmp)
    safetensors.numpy.save_file(tensors, os.path.join(tmp, _SAFETENSORS),
                                metadata={"format": "pt"})
    for name in ("config.json", _SAFETENSORS):
      os.replace(os.path.join(tmp, name), os.path.join(path, name))
  return path
