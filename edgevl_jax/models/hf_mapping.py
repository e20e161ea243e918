"""How a student family's Flax parameters map to Hugging Face tensors.

Each family file (vit.py, swin.py, resnet.py, mobilenet.py) declares one
`StudentMapping`: rules from its Flax module paths to HF module names, the
prefix of its *ForImageClassification checkpoints and the renames that turn
transformers >= 5 in-memory names (what `torch.save(model.state_dict())`
writes) into the hub names (what `save_pretrained` writes). `convert` then
applies, per tensor, the layouts of `hf_io.torch_to_flax`, and fuses separate
query/key/value Linears into one qkv Dense (q | k | v along the output).

Ignored everywhere: the classifier, ViT's pooler, BatchNorm
num_batches_tracked.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from edgevl_jax.models import hf_io

IGNORED = re.compile(r"^(classifier\..*|pooler\..*|.*\.num_batches_tracked)$")
# transformers >= 5 in-memory names of a ViT / Swin block -> hub names,
# applied after the family's own renames.
BLOCK_RENAMES = ((r"\.attention\.o_proj\.", r".attention.output.dense."),
                 (r"\.mlp\.fc1\.", r".intermediate.dense."),
                 (r"\.mlp\.fc2\.", r".output.dense."),
                 (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."),
                 (r"\.v_proj\.", ".value."))


def block_rules(block: str, hf_block: str, attention: str
                ) -> tuple[tuple[str, str], ...]:
  """Rules of a pre-norm transformer block (vit.EncoderBlock layout) whose
  HF counterpart is a ViTLayer / SwinLayer.

  Args:
    block: Flax block path regex, e.g. r"block(\d+)".
    hf_block: HF block template, e.g. r"encoder.layer.\1".
    attention: HF module holding query/key/value under the block.
  """
  return ((rf"{block}/norm1", rf"{hf_block}.layernorm_before"),
          (rf"{block}/attn/qkv", rf"{hf_block}.{attention}.{{qkv}}"),
          (rf"{block}/attn/proj", rf"{hf_block}.attention.output.dense"),
          (rf"{block}/norm2", rf"{hf_block}.layernorm_after"),
          (rf"{block}/mlp/fc1", rf"{hf_block}.intermediate.dense"),
          (rf"{block}/mlp/fc2", rf"{hf_block}.output.dense"))


@dataclasses.dataclass(frozen=True)
class StudentMapping:
  """A family's Flax <-> Hugging Face naming.

  Attributes:
    model_type: config.json `model_type` ('vit', 'swin', ...).
    prefix: key prefix in *ForImageClassification checkpoints ('vit.').
    rules: (Flax module path regex, HF module name template) pairs, first
      match wins; '{qkv}' in a template expands to query, key, value (one
      fused Flax leaf from three tensors). A rule matching a whole leaf path
      (e.g. 'cls_token') maps that leaf to the template as is.
    renames: (regex, replacement) from in-memory to hub names, in order.
  """

  model_type: str
  prefix: str
  rules: tuple[tuple[str, str], ...]
  renames: tuple[tuple[str, str], ...] = ()

  def hub_names(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state` with the prefix stripped, hub names, ignored tensors dropped."""
    out = {}
    for k, v in state.items():
      k = k[len(self.prefix):] if k.startswith(self.prefix) else k
      for pattern, hub in self.renames:
        k = re.sub(pattern, hub, k)
      if not IGNORED.match(k):
        out[k] = v
    return out

  def tensor_names(self, flax_path: tuple[str, ...]) -> list[str]:
    """HF tensor names that make up one backbone leaf (3 for fused qkv)."""
    *module, leaf = flax_path
    joined = "/".join(flax_path)
    for pattern, target in self.rules:
      if re.fullmatch(pattern, joined):  # a leaf mapped whole
        return [re.sub(pattern, target, joined)]
      if module and re.fullmatch(pattern, "/".join(module)):
        base = re.sub(pattern, target, "/".join(module))
        name = f"{base}.{hf_io.LEAF_NAMES.get(leaf, leaf)}"
        if "{qkv}" in name:
          return [name.format(qkv=p) for p in ("query", "key", "value")]
        return [name]
    raise ValueError(f"no Hugging Face tensor maps to student parameter "
                     f"{joined!r} ({self.model_type}).")

  def convert(self, state: dict[str, np.ndarray],
              shapes: dict[tuple[str, ...], tuple[int, ...]], *, where: str
              ) -> dict[tuple[str, ...], np.ndarray]:
    """Maps an HF state dict onto backbone leaves {(collection, *path): shape}.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped tensor.
    """
    state = self.hub_names(state)
    plan = {key: self.tensor_names(key[1:]) for key in shapes}
    wanted = {}
    for key, names in plan.items():
      shape = tuple(shapes[key])
      # A fused leaf splits along its output (last Flax) axis.
      part = shape if len(names) == 1 else (
          shape[:-1] + (shape[-1] // len(names),))
      wanted.update({n: hf_io.torch_shape(part, key[-1]) for n in names})
    hf_io.match_tensors(state, wanted, where=where,
                        model=f"{self.model_type} student")
    return {key: np.concatenate(
        [hf_io.torch_to_flax(state[n], key[-1]) for n in names], axis=-1)
            if len(names) > 1 else hf_io.torch_to_flax(state[names[0]], key[-1])
            for key, names in plan.items()}
