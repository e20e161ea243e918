"""Bad teacher / student folders stop with one message naming the problem.

Tiny HF CLIP and ViT folders are built with transformers and saved to
tmp_path, then broken one way each: no tokenizer, a tokenizer larger than
the text tower, NaN / inf weights, invalid JSON, a sharded index without
its weight_map, a truncated weight file.
"""
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from edgevl_jax.edgevl import handoff
from edgevl_jax.models import clip
from edgevl_jax.models import students
from edgevl_jax.utils import jsonio

CORPUS = ["a photo of a cat.", "a photo of a dog.", "a depth image of a chair.",
          "a bedroom with a bed and a lamp."]


def _clip_config(vocab_size):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=16,
                       intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16,
                       eos_token_id=1, bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=8),
      projection_dim=8)


@pytest.fixture(scope="module", name="tok_dir")
def _tok_dir(tmp_path_factory):
  return clip.train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"),
                              vocab_size=300)


def _teacher(path, tok_dir, *, vocab_size=None, tokenizer=True):
  """An HF CLIP folder; vocab_size defaults to the tokenizer's size."""
  size = len(clip.load_tokenizer(tok_dir))
  torch.manual_seed(0)
  hf = transformers.CLIPModel(_clip_config(vocab_size or size))
  hf.save_pretrained(path)
  if tokenizer:
    for name in os.listdir(tok_dir):
      shutil.copy(os.path.join(tok_dir, name), path)
  return str(path)


def test_good_teacher_folder_passes_and_loads(tmp_path, tok_dir):
  path = _teacher(tmp_path / "t", tok_dir)
  info = clip.check_clip_folder(path)
  assert info["weights"] == "model.safetensors"
  assert info["tokenizer_vocab_size"] <= info["text_vocab_size"]
  model, params, tok = handoff.load_teacher(path)
  assert len(tok) <= model.config.text.vocab_size


def test_folder_without_tokenizer_is_refused(tmp_path, tok_dir):
  path = _teacher(tmp_path / "t", tok_dir, tokenizer=False)
  with pytest.raises(ValueError) as e:
    clip.load_tokenizer(path)
  msg = str(e.value)
  assert msg.startswith(f"load_tokenizer: '{path}' has no tokenizer (missing "
                        "vocab.json / merges.txt / tokenizer.json")
  assert "A CLIP folder holds config.json" in msg
  assert "model.safetensors" in msg and "pytorch_model.bin" in msg
  with pytest.raises(ValueError, match=r"is not usable: no tokenizer files "
                     r"\(missing vocab.json / merges.txt / tokenizer.json\)"):
    clip.check_clip_folder(path)
  with pytest.raises(ValueError, match="no tokenizer files"):
    handoff.load_teacher(path)
  # An image-tower-only job (CKA) may use it.
  assert clip.check_clip_folder(path, tokenizer=False)["tokenizer_vocab_size"] \
      is None
  # Half a tokenizer: the missing half is named.
  shutil.copy(os.path.join(tok_dir, "vocab.json"), path)
  with pytest.raises(ValueError, match=r"missing merges\.txt"):
    clip.load_tokenizer(path)


def test_check_clip_folder_lists_every_problem(tmp_path):
  path = tmp_path / "empty"
  path.mkdir()
  (path / "config.json").write_text('{"model_type": "clip", ')
  with pytest.raises(ValueError) as e:
    clip.check_clip_folder(path)
  msg = str(e.value)
  assert f"CLIP folder '{path}' is not usable: " in msg
  assert f"{path}/config.json is not valid JSON" in msg
  assert "no weights (model.safetensors, model.safetensors.index.json or " \
         "pytorch_model.bin)" in msg
  assert "no tokenizer files" in msg
  with pytest.raises(ValueError, match="does not exist"):
    clip.check_clip_folder(tmp_path / "nope")


def test_tokenizer_larger_than_text_vocab_is_refused(tmp_path, tok_dir):
  size = len(clip.load_tokenizer(tok_dir))
  path = _teacher(tmp_path / "t", tok_dir, vocab_size=100)
  want = (rf"has {size} tokens \(ids up to {size - 1}\) but .* has "
          rf"text_config.vocab_size=100")
  with pytest.raises(ValueError, match=want):
    clip.load_tokenizer(path)
  with pytest.raises(ValueError, match=want):
    clip.check_clip_folder(path)
  # The zero-shot classifier refuses ids the text tower cannot embed.
  model, params = clip.load_pretrained(path)
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  with pytest.raises(ValueError, match=r"token id \d+ but the text tower "
                     r"has vocab_size=100"):
    clip.zero_shot_classifier(model, params, tok, ["cat"], "a photo of a {}.")
  with pytest.raises(ValueError, match=rf"has {size} tokens"):
    clip.check_tokenizer_fits(tok, 100)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_teacher_weights_are_named(tmp_path, tok_dir, bad):
  path = _teacher(tmp_path / "t", tok_dir)
  file = os.path.join(path, "model.safetensors")
  state = safetensors.numpy.load_file(file)
  name = "text_model.encoder.layers.0.mlp.fc1.weight"
  state[name][0, :3] = bad
  safetensors.numpy.save_file(state, file)
  with pytest.raises(ValueError, match=rf"CLIP checkpoint '{path}': 1 "
                     rf"tensor\(s\) hold NaN or inf values \('{name}': 3 of "
                     rf"{state[name].size} values are NaN or inf\)"):
    clip.load_pretrained(path)


def _tiny_vit(path):
  torch.manual_seed(0)
  model = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=24, image_size=16, patch_size=8))
  model.save_pretrained(str(path))
  return str(path)


def test_non_finite_student_weights_are_named(tmp_path):
  path = _tiny_vit(tmp_path)
  file = os.path.join(path, "model.safetensors")
  state = safetensors.numpy.load_file(file)
  name = "encoder.layer.0.output.dense.weight"
  state[name][1, 1] = np.nan
  state["layernorm.bias"][:] = -np.inf
  safetensors.numpy.save_file(state, file)
  with pytest.raises(ValueError) as e:
    students.load_hf(path, embed_dim=8)
  msg = str(e.value)
  assert msg.startswith(f"student checkpoint '{path}': 2 tensor(s) hold NaN "
                        "or inf values")
  assert f"'{name}': 1 of {state[name].size} values are NaN or inf" in msg
  assert "'layernorm.bias': 16 of 16 values" in msg


def test_invalid_config_json_is_named(tmp_path, tok_dir):
  student = _tiny_vit(tmp_path / "s")
  with open(os.path.join(student, "config.json"), "a") as f:
    f.write("}")  # trailing garbage
  with pytest.raises(ValueError, match=rf"{student}/config.json is not valid "
                     r"JSON \(Extra data at line \d+ column \d+.*re-save the "
                     "model with save_pretrained"):
    students.load_hf(student)
  teacher = _teacher(tmp_path / "t", tok_dir)
  with open(os.path.join(teacher, "config.json"), "w") as f:
    f.write('{"model_type": "clip"')  # truncated
  with pytest.raises(ValueError, match=rf"{teacher}/config.json is not valid "
                     "JSON"):
    clip.load_pretrained(teacher)
  with pytest.raises(ValueError, match=rf"{teacher}/config.json is not valid "
                     "JSON"):
    clip.load_tokenizer(teacher)


def test_sharded_index_without_weight_map_is_named(tmp_path, tok_dir):
  for path in (_teacher(tmp_path / "t", tok_dir), _tiny_vit(tmp_path / "s")):
    os.rename(os.path.join(path, "model.safetensors"),
              os.path.join(path, "model-00001-of-00001.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index, "w") as f:
      json.dump({"metadata": {"total_size": 1}}, f)
    want = (rf"{index} has no 'weight_map' \(top-level keys: \['metadata'\]\);"
            " re-save the sharded checkpoint")
    loader = (clip.load_pretrained if path.endswith("t")
              else students.load_hf)
    with pytest.raises(ValueError, match=want):
      loader(path)
    if path.endswith("t"):
      with pytest.raises(ValueError, match=want):
        clip.check_clip_folder(path)


def test_truncated_weights_found_by_the_cheap_check(tmp_path, tok_dir):
  path = _teacher(tmp_path / "t", tok_dir)
  file = os.path.join(path, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(ValueError, match=rf"{file} is truncated \({size - 100} "
                     rf"bytes, its header needs {size}\)"):
    clip.check_clip_folder(path)


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "x.json"
  with pytest.raises(ValueError, match=rf"{path} does not exist; fix it\."):
    jsonio.read_json(path, fix="fix it")
  path.write_text("")
  with pytest.raises(ValueError, match=r"x.json is empty"):
    jsonio.read_json(path)
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"holds a JSON list, expected an "
                     "object"):
    jsonio.read_json(path)
  path.write_text('{"a": 1}')
  assert jsonio.read_json(path, required=("a",)) == {"a": 1}
