"""Parity of the students with Hugging Face PyTorch models on tiny configs.

Each family's torch model gets random norm parameters, biases, position
tables and BatchNorm running statistics (so a swapped scale/bias, a wrong
transpose or ignored running stats fails), is saved both as
model.safetensors (hub names) and as pytorch_model.bin (in-memory names),
and both folders must load to the same variables and reproduce `pooled` and
the stage outputs to a relative error of 1e-4.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr

from edgevl_jax.models import students
from edgevl_jax.models.vit import stage_blocks

TOL = 1e-4


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _randomise(model: torch.nn.Module) -> None:
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith("running_mean"):
        t.copy_(torch.rand(t.shape, generator=gen) - 0.5)
      elif name.endswith("running_var"):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif t.ndim == 1 or "table" in name or "embeddings" in name.split(".")[-1] \
          or name.endswith("cls_token"):
        t.add_(0.2 * torch.randn(t.shape, generator=gen))


def _save_both(model: torch.nn.Module, tmp_path) -> tuple[str, str]:
  st_dir, bin_dir = str(tmp_path / "st"), str(tmp_path / "bin")
  model.save_pretrained(st_dir)
  os.makedirs(bin_dir)
  model.config.to_json_file(os.path.join(bin_dir, "config.json"))
  torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
  return st_dir, bin_dir


def _images(size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(
      np.float32)


def _reference(family, model, x):
  """(pooled, stages) of the torch model, channels last."""
  pix = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    if family == "vit":
      out = model(pix, output_hidden_states=True)
      taps = stage_blocks(model.config.num_hidden_layers)
      return (out.last_hidden_state.mean(1),
              [out.hidden_states[i + 1] for i in taps])
    if family == "swin":
      out = model(pix, output_hidden_states=True,
                  output_hidden_states_before_downsampling=True)
      return (out.pooler_output, [h.permute(0, 2, 3, 1)
                                  for h in out.reshaped_hidden_states[1:]])
    out = model(pix, output_hidden_states=True)
    hidden = out.hidden_states
    hidden = ([hidden[i] for i in (0, 3, 10, 15)] if family == "mobilenet_v2"
              else hidden[1:])
    return (out.pooler_output.flatten(1),
            [h.permute(0, 2, 3, 1) for h in hidden])


CASES = {
    "vit": (lambda: tr.ViTModel(tr.ViTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=24, image_size=16, patch_size=4)), 16),
    # Shifted windows with masks in stages 1-3; the last stage equals the
    # window, so its shift is disabled.
    "swin": (lambda: tr.SwinModel(tr.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2, 1, 1],
        num_heads=[1, 2, 2, 4], window_size=2)), 32),
    # 10x10 and 5x5 maps are padded to the window 3, 5x5 is padded before
    # merging; the shortcut in ResNet stage 0 comes from 6 -> 8 channels.
    "swin_padded": (lambda: tr.SwinModel(tr.SwinConfig(
        image_size=40, patch_size=4, embed_dim=8, depths=[2, 2, 1],
        num_heads=[1, 2, 2], window_size=3)), 40),
    "resnet": (lambda: tr.ResNetModel(tr.ResNetConfig(
        embedding_size=6, hidden_sizes=[8, 8, 16, 16], depths=[1, 2, 1, 1],
        layer_type="basic")), 32),
    "mobilenet_v2": (lambda: tr.MobileNetV2Model(tr.MobileNetV2Config(
        depth_multiplier=0.25, image_size=32)), 32),
    # PyTorch symmetric padding, 1280 * width output channels.
    "mobilenet_v2_torch_pad": (lambda: tr.MobileNetV2Model(
        tr.MobileNetV2Config(depth_multiplier=0.35, image_size=32,
                             tf_padding=False, finegrained_output=False)), 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_hugging_face(case, tmp_path):
  make, size = CASES[case]
  torch.manual_seed(0)
  ref_model = make().eval()
  _randomise(ref_model)
  family = ref_model.config.model_type
  st_dir, bin_dir = _save_both(ref_model, tmp_path)
  model, variables = students.load_hf(st_dir)
  _, variables_bin = students.load_hf(bin_dir)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_bin)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ("batch_stats" in variables) == (family in ("resnet", "mobilenet_v2"))

  x = _images(size)
  ref_pooled, ref_stages = _reference(family, ref_model, x)
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(
      variables, jnp.asarray(x))
  assert _rel_err(feats["pooled"], ref_pooled) <= TOL
  assert len(feats["stages"]) == len(ref_stages)
  for ours, ref in zip(feats["stages"], ref_stages):
    assert ours.shape == tuple(ref.shape)
    assert _rel_err(ours, ref) <= TOL


def test_classification_checkpoint_with_fresh_head(tmp_path):
  torch.manual_seed(0)
  ref = tr.ResNetForImageClassification(tr.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
      layer_type="basic", num_labels=5)).eval()
  _randomise(ref)
  ref.save_pretrained(str(tmp_path))
  model, variables = students.load_hf(str(tmp_path), embed_dim=12)
  assert variables["params"]["head"]["proj"]["kernel"].value.shape == (8, 12)
  emb, feats = jax.jit(lambda v, x: (
      model.apply(v, x), model.apply(v, x, method="features")))(
          variables, jnp.asarray(_images(32)))
  assert emb.shape == (2, 12)
  head = variables["params"]["head"]["proj"]
  np.testing.assert_allclose(
      emb, feats["pooled"] @ head["kernel"].value + head["bias"].value,
      rtol=1e-5, atol=1e-6)
  pooled = ref.resnet(torch.from_numpy(_images(32).transpose(0, 3, 1, 2)))
  assert _rel_err(feats["pooled"], pooled.pooler_output.detach().flatten(1)
                  ) <= TOL


def _tiny_vit(tmp_path):
  ref = tr.ViTModel(tr.ViTConfig(
      hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=8, image_size=8, patch_size=4))
  ref.save_pretrained(str(tmp_path))
  return ref


def test_mis_shaped_tensor_is_named(tmp_path):
  _tiny_vit(tmp_path)
  cfg_path = tmp_path / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["intermediate_size"] = 12
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate"
                     r"\.dense\.(weight|bias)' has shape \(8.*expected \(12"):
    students.load_hf(str(tmp_path))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  ref = _tiny_vit(tmp_path)
  sd = {k: v for k, v in ref.state_dict().items() if "layernorm_after" not in k}
  sd["encoder.layer.0.extra.weight"] = torch.zeros(2)
  os.remove(tmp_path / "model.safetensors")
  torch.save(sd, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"missing tensors \['encoder\.layer\.0"
                     r"\.layernorm_after\.bias', .*unexpected tensors "
                     r"\['encoder\.layer\.0\.extra\.weight'\]"):
    students.load_hf(str(tmp_path))


def test_unsupported_config_is_named(tmp_path):
  tr.ResNetConfig(layer_type="bottleneck").save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="layer_type='bottleneck' is not "
                     "supported"):
    students.load_hf(str(tmp_path))
  tr.MobileNetV2Config(output_stride=16).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="output_stride=16"):
    students.load_hf(str(tmp_path))


def test_missing_weights_file_is_named(tmp_path):
  tr.ViTConfig().save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="no model.safetensors"):
    students.load_hf(str(tmp_path))


def test_absent_config_keys_take_transformers_defaults(tmp_path):
  _tiny_vit(tmp_path)
  cfg_path = tmp_path / "config.json"
  cfg = json.loads(cfg_path.read_text())
  del cfg["layer_norm_eps"], cfg["qkv_bias"]
  cfg["image_size"] = [8, 8]
  cfg_path.write_text(json.dumps(cfg))
  model, _ = students.load_hf(str(tmp_path))
  assert model.backbone.layer_norm_eps == 1e-12
  assert model.backbone.image_size == 8
