"""HF checkpoint loading/saving of the Flax CLIP, checked against PyTorch HF."""
import json
import os
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from edgevl_jax.models import clip

VOCAB = 99


def _hf_config(act="quick_gelu", eos=2, image=32, patch=8, text_width=32,
               vision_width=32, heads=4):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=text_width,
                       intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=heads, max_position_embeddings=16,
                       hidden_act=act, eos_token_id=eos, bos_token_id=0,
                       pad_token_id=1),
      vision_config=dict(hidden_size=vision_width, intermediate_size=41,
                         num_hidden_layers=2, num_attention_heads=heads,
                         image_size=image, patch_size=patch, hidden_act=act),
      projection_dim=24)


def _hf_model(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms start at 1/0: perturb so all is tested
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _save(hf, path, safe):
  """HF folder; transformers 5 writes safetensors only, so the legacy
  pytorch_model.bin (with the old `position_ids` buffers) is written here."""
  if safe:
    hf.save_pretrained(path)
    return
  hf.config.save_pretrained(path)
  state = dict(hf.state_dict())
  state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
  torch.save(state, os.path.join(path, "pytorch_model.bin"))


def _inputs(config, legacy_eos):
  rng = np.random.default_rng(0)
  size = config.vision_config.image_size
  images = rng.standard_normal((3, size, size, 3)).astype(np.float32)
  lengths = [4, 9, 12]
  ids = rng.integers(3, VOCAB - 2, (3, 12))
  # Legacy pooling takes the largest id; modern pooling the first eos, and
  # padding with eos (as CLIP's tokenizer does) must not move it.
  eos = VOCAB - 1 if legacy_eos else config.text_config.eos_token_id
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, 0] = 0
    ids[row, n - 1] = eos
    ids[row, n:] = 1 if legacy_eos else eos
    mask[row, :n] = 1
  return images, ids, mask


def _hf_outputs(hf, images, ids, mask):
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids),
             pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
             attention_mask=torch.tensor(mask))
    hidden = hf.vision_model(
        pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
        output_hidden_states=True).hidden_states
  return out, [h.numpy() for h in hidden[1:]]


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


CASES = {
    # (config overrides, safetensors (True) or pytorch_model.bin (False))
    "quick_gelu-legacy_eos-safetensors": (dict(), True),
    "gelu-modern_eos-bin": (
        dict(act="gelu", eos=VOCAB - 3, image=24, patch=6, text_width=48,
             heads=2), False),
    "quick_gelu-modern_eos-safetensors": (
        dict(eos=VOCAB - 3, image=16, patch=4, vision_width=48), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_hf_pytorch(tmp_path, case):
  kwargs, safe = CASES[case]
  config = _hf_config(**kwargs)
  hf = _hf_model(config)
  _save(hf, tmp_path, safe)
  assert os.path.isfile(tmp_path / ("model.safetensors" if safe
                                    else "pytorch_model.bin"))
  model, params = clip.load_pretrained(tmp_path)
  images, ids, mask = _inputs(config, legacy_eos=config.text_config
                              .eos_token_id == 2)
  out, hidden = _hf_outputs(hf, images, ids, mask)

  @jax.jit
  def run(p):
    return (model.apply({"params": p}, images, ids, mask),
            model.apply({"params": p}, images, method="encode_image"),
            model.apply({"params": p}, images, method="image_features"))

  ours, img, feats = run(params)
  for key in ("image_embeds", "text_embeds", "logits_per_image",
              "logits_per_text"):
    assert _rel(ours[key], getattr(out, key).numpy()) < 1e-5, key
  with torch.no_grad():
    hf_img = hf.get_image_features(
        pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    hf_img = getattr(hf_img, "pooler_output", hf_img).numpy()
  assert img.dtype == np.float32 and _rel(img, hf_img) < 1e-5
  assert len(feats["stages"]) == len(hidden) == 2
  for ours_h, hf_h in zip(feats["stages"], hidden):
    assert _rel(ours_h, hf_h) < 1e-5


def test_round_trip_hf_ours_hf(tmp_path):
  hf = _hf_model(_hf_config(act="gelu", eos=VOCAB - 3))
  hf.save_pretrained(tmp_path / "hf")
  model, params = clip.load_pretrained(tmp_path / "hf")
  clip.save_pretrained(tmp_path / "ours", model, params)
  back = transformers.CLIPModel.from_pretrained(tmp_path / "ours").eval()
  ref = hf.state_dict()
  got = back.state_dict()
  assert set(got) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(got[k].numpy(), v.numpy(), err_msg=k)
  assert back.config.text_config.eos_token_id == VOCAB - 3
  assert back.config.vision_config.hidden_act == "gelu"


def test_saved_random_init_loads_in_hf(tmp_path):
  config = _hf_config()
  model = clip.CLIP(config)
  params = clip.init_params(model, jax.random.key(1), image_size=32)
  clip.save_pretrained(tmp_path, model, params)
  hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  images, ids, mask = _inputs(config, legacy_eos=True)
  out, _ = _hf_outputs(hf, images, ids, mask)
  ours = jax.jit(model.apply)({"params": params}, images, ids, mask)
  assert _rel(ours["logits_per_image"], out.logits_per_image.numpy()) < 1e-5


@pytest.fixture(name="saved")
def _saved(tmp_path):
  _hf_model(_hf_config()).save_pretrained(tmp_path)
  return tmp_path


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    clip.load_pretrained(tmp_path / "nowhere")


def test_missing_weight_file(saved):
  os.remove(saved / "model.safetensors")
  with pytest.raises(FileNotFoundError,
                     match="no weight file.*model.safetensors.*pytorch_model"):
    clip.load_pretrained(saved)


def test_non_clip_config(saved):
  config = json.loads((saved / "config.json").read_text())
  config["model_type"] = "siglip"
  (saved / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json.*'siglip'.*expected 'clip'"):
    clip.load_pretrained(saved)


def test_wrong_shaped_missing_and_unexpected_tensors(saved):
  file = str(saved / "model.safetensors")
  state = safetensors.numpy.load_file(file)
  state["vision_model.embeddings.patch_embedding.weight"] = np.zeros(
      (32, 3, 4, 4), np.float32)
  del state["text_model.final_layer_norm.bias"]
  state["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
  safetensors.numpy.save_file(state, file, metadata={"format": "pt"})
  with pytest.raises(ValueError) as err:
    clip.load_pretrained(saved)
  msg = str(err.value)
  assert ("tensor 'vision_model.embeddings.patch_embedding.weight' has shape "
          "(32, 3, 4, 4), expected (32, 3, 8, 8)") in msg
  assert "missing tensors ['text_model.final_layer_norm.bias']" in msg
  assert "unexpected tensors ['vision_model.extra_head.weight']" in msg


def test_truncated_safetensors(saved):
  file = saved / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors.*truncated"):
    clip.load_pretrained(saved)


def test_bin_without_torch_says_so(tmp_path, monkeypatch):
  _save(_hf_model(_hf_config()), tmp_path, safe=False)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="pytorch_model.bin.*needs torch"):
    clip.load_pretrained(tmp_path)


def test_save_refuses_params_of_another_config(tmp_path):
  model = clip.CLIP(_hf_config())
  other = clip.CLIP(_hf_config(patch=4))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: clip.init_params(other, jax.random.key(0))))
  with pytest.raises(ValueError, match="patch_embedding.weight"):
    clip.save_pretrained(tmp_path, model, params)
  assert not (tmp_path / "model.safetensors").exists()
