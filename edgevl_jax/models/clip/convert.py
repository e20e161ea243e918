"""Hugging Face CLIP checkpoints <-> Flax `CLIP` params.

The Flax tree uses HF's names, so each tensor is renamed by `hf_name` and
transposed by `hf_io.torch_to_flax` / `hf_io.flax_to_torch`:
  `encoder.layers.{i}`                 <->  `encoder/layers_{i}`
  Linear `weight` (out, in)            <->  Dense `kernel` (in, out)
  Conv2d `weight` (out, in, kh, kw)    <->  Conv `kernel` (kh, kw, in, out)
  LayerNorm `weight`                   <->  `scale`
  Embedding `weight`                   <->  `embedding`
  `class_embedding`, `logit_scale`, `bias`: unchanged.
`position_ids` buffers in old checkpoints are ignored. Everything else must
match exactly: a missing, unexpected or mis-shaped tensor is an error. The
folder itself (config.json, weight files, NaN checks) is read by hf_io.py.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from edgevl_jax.models import hf_io
from edgevl_jax.models import layers
from edgevl_jax.models.clip.model import CLIP
from edgevl_jax.models.clip.model import init_params
from edgevl_jax.utils import io

_WHAT = "CLIP checkpoint"
_FIX = ("pass a local Hugging Face CLIP folder (config.json plus "
        "model.safetensors or pytorch_model.bin), or re-save the model with "
        "CLIPModel.save_pretrained (or clip.save_pretrained)")


def hf_name(path: tuple[str, ...]) -> str:
  """Flax param path -> HF tensor name (every rename of the conversion)."""
  parts = []
  for p in path[:-1]:
    if p.startswith("layers_") and p[len("layers_"):].isdigit():
      parts += ["layers", p[len("layers_"):]]
    else:
      parts.append(p)
  return ".".join(parts + [hf_io.LEAF_NAMES.get(path[-1], path[-1])])


def params_from_hf(state: Mapping[str, np.ndarray], model: CLIP, *,
                   where: str = _WHAT) -> dict:
  """Converts an HF `CLIPModel` state dict to float32 params of `model`.

  `where` names the checkpoint in errors (e.g. its folder).

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped tensor with
      its expected and found shape (HF layout).
  """
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
  names = {path: hf_name(path) for path in expected}
  wanted = {names[path]: hf_io.torch_shape(s.shape, path[-1])
            for path, s in expected.items()}
  state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
  hf_io.match_tensors(state, wanted, where=where, model="CLIP model")
  return flax.traverse_util.unflatten_dict({
      path: np.asarray(hf_io.torch_to_flax(np.asarray(state[names[path]]),
                                           path[-1]), np.float32)
      for path in expected})


def params_to_hf(params: Any) -> dict[str, np.ndarray]:
  """Flax params -> HF `CLIPModel` state dict (float32, contiguous)."""
  out = {}
  for path, x in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(params)).items():
    x = np.asarray(jax.device_get(x), np.float32)
    out[hf_name(tuple(path))] = np.array(hf_io.flax_to_torch(x, path[-1]),
                                         order="C")  # keeps 0-d
  return out


def load_config(path: str | os.PathLike[str]) -> Any:
  """The `transformers.CLIPConfig` of an HF folder, checked to be CLIP.

  Raises:
    MissingFileError (a FileNotFoundError and ValueError): no folder or no
      config.json.
    ValueError: config.json is not JSON or not a CLIP config.
  """
  path = os.fspath(path)
  hf_io.read_config(path, what=_WHAT, model_types=("clip",), fix=_FIX)
  # transformers takes seconds to import; only loading a config needs it.
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.CLIPConfig.from_pretrained(path, local_files_only=True)


def load_pretrained(path: str | os.PathLike[str], *,
                    dtype: Any = jnp.float32, ops: Any = None
                    ) -> tuple[CLIP, dict]:
  """Loads a local HF CLIP folder as a Flax `CLIP` and float32 params.

  Args:
    path: folder with config.json and model.safetensors (or a sharded
      model.safetensors.index.json, or pytorch_model.bin, which needs torch).
    dtype: compute dtype of the returned model (params stay float32).
    ops: optional `layers.Ops` (e.g. AQT); default plain lax.

  Returns:
    (model, params) for `model.apply({'params': params}, ...)`.
  """
  path = os.fspath(path)
  model = CLIP(config=load_config(path), dtype=dtype,
               ops=ops or layers.Ops())
  state = hf_io.read_state_dict(path, what=_WHAT)
  return model, params_from_hf(state, model, where=f"{_WHAT} {path!r}")


def save_pretrained(path: str | os.PathLike[str], model: CLIP,
                    params: Any) -> str:
  """Writes config.json + model.safetensors that HF `CLIPModel` loads.

  Each file is written atomically (utils/io.py), the weights first, so an
  interrupted save never leaves a half-written file. Returns `path`.
  """
  path = os.fspath(path)
  tensors = params_to_hf(params)
  # Refuse params that do not fit the config.
  params_from_hf(tensors, model, where=f"clip.save_pretrained({path!r})")
  with io.atomic_path(os.path.join(path, hf_io.SAFETENSORS)) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
  io.atomic_write_text(os.path.join(path, hf_io.CONFIG),
                       model.config.to_hf().to_json_string(use_diff=True))
  return path
