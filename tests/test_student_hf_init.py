"""Stage 1 starts its student from a Hugging Face checkpoint when asked.

A tiny random HF ViT is saved to a folder; the stage-1 trainer's own init
path (`student_meta` -> `handoff.build_student` -> `student_init_fn` ->
`state.create_train_state`) must put exactly its weights into the train
state, record an architecture that rebuilds the same model, and refuse a
config whose student disagrees with the folder before any compute.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers as tr

from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import student_spec as kd
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

S, D = 32, 16
# ViT-Ti/16 shrunk to the checkpoint below: width 32, 1 block, 2 heads.
MATCHING = dict(image_size=S, patch_size=16, width=32, depth=1, num_heads=2,
                drop_path_rate=0.0)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  """(folder, torch state dict) of a tiny random ViT."""
  torch.manual_seed(0)
  config = tr.ViTConfig(hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=128,
                        image_size=S, patch_size=16)
  model = tr.ViTModel(config, add_pooling_layer=False)
  with torch.no_grad():  # non-trivial biases and norms, unlike a fresh init
    for t in model.state_dict().values():
      t.add_(0.1 * torch.randn(t.shape))
  path = str(tmp_path_factory.mktemp("hf_vit"))
  model.save_pretrained(path)
  return path, {k: v.numpy() for k, v in model.state_dict().items()}


def _config(hf_path, **overrides):
  return ml_collections.ConfigDict(dict(
      image_size=S, student=dict(
          name="vit_ti16", normalization="imagenet", hf_path=hf_path,
          overrides=dict(MATCHING, **overrides))))


def _initial_params(config):
  """The stage-1 trainer's initial student params (replicated state)."""
  kd.validate_student(config)
  meta = kd.student_meta(config, D)
  model = handoff.build_student(meta)
  init_fn = kd.student_init_fn(config, model, meta, jax.random.key(5))
  tx = optim_lib.make_optimizer(ml_collections.ConfigDict(
      dict(name="adamw", lr=1e-3, schedule="constant")), 10)
  state, _ = state_lib.create_train_state(
      init_fn, tx, jax.random.key(0), mesh=mesh_lib.make_mesh(),
      rules=mesh_lib.REPLICATED_RULES)
  return meta, model, jax.device_get(state.params)


def test_initial_params_are_the_checkpoint(hf_vit):
  path, sd = hf_vit
  meta, model, params = _initial_params(_config(path))
  bb = params["backbone"]
  torch_kernel = sd["embeddings.patch_embeddings.projection.weight"]
  np.testing.assert_allclose(bb["patch_embed"]["kernel"],
                             torch_kernel.transpose(2, 3, 1, 0), atol=1e-6)
  np.testing.assert_allclose(bb["pos_embed"],
                             sd["embeddings.position_embeddings"], atol=1e-6)
  np.testing.assert_allclose(
      bb["block0"]["mlp"]["fc1"]["kernel"],
      sd["layers.0.mlp.fc1.weight"].T, atol=1e-6)
  np.testing.assert_allclose(
      bb["block0"]["attn"]["qkv"]["kernel"],
      np.concatenate([sd[f"layers.0.attention.{p}_proj.weight"].T
                      for p in "qkv"], axis=1), atol=1e-6)
  np.testing.assert_allclose(bb["norm"]["bias"], sd["layernorm.bias"],
                             atol=1e-6)
  # The head (to the teacher's D) is freshly initialised.
  assert params["head"]["proj"]["kernel"].shape == (32, D)
  # From scratch (hf_path '') gives different backbone weights.
  _, _, scratch = _initial_params(_config(""))
  diff = np.abs(scratch["backbone"]["patch_embed"]["kernel"]
                - bb["patch_embed"]["kernel"]).max()
  assert diff > 1e-2, diff
  # student.json records the checkpoint's architecture (HF LayerNorm eps)
  # and rebuilds the same model with the same outputs.
  assert meta["overrides"]["layer_norm_eps"] == pytest.approx(1e-12)
  assert meta["overrides"]["mlp_dim"] == 128
  rebuilt = handoff.build_student(meta)
  assert rebuilt.backbone == model.backbone
  x = jax.random.uniform(jax.random.key(1), (2, S, S, 3))
  np.testing.assert_allclose(rebuilt.apply({"params": params}, x),
                             model.apply({"params": params}, x), atol=1e-6)


def test_missing_key_or_empty_trains_from_scratch(hf_vit):
  config = _config("")
  del config.student["hf_path"]
  # A config without the key gets the schema default '' (from scratch).
  config.student = config_lib.build(kd.SCHEMA, config.student)
  assert config.student.hf_path == ""
  kd.validate_student(config)
  meta = kd.student_meta(config, D)
  assert meta["overrides"] == dict(MATCHING)
  init_fn = kd.student_init_fn(config, handoff.build_student(meta), meta,
                               jax.random.key(0))
  variables = init_fn(jax.random.key(3))
  ref = handoff.build_student(meta).init(jax.random.key(3),
                                           jnp.zeros((1, S, S, 3)))
  np.testing.assert_array_equal(
      jax.tree.leaves(variables["params"])[0],
      jax.tree.leaves(ref["params"])[0])


@pytest.mark.parametrize("overrides,match", [
    (dict(width=64), r"hidden_size=32.*config.student.overrides gives "
                     r"width=64"),
    (dict(depth=2), r"num_hidden_layers=1.*depth=2"),
    (dict(patch_size=8), r"patch_size=16.*patch_size=8"),
    (dict(layer_norm_eps=1e-6), r"layer_norm_eps=1e-12.*layer_norm_eps=1e-06"),
])
def test_mismatched_architecture_fails_before_compute(hf_vit, overrides,
                                                      match):
  with pytest.raises(ValueError, match=match):
    kd.validate_student(_config(hf_vit[0], **overrides))


def test_name_preset_and_family_mismatch(hf_vit):
  config = _config(hf_vit[0])
  del config.student.overrides["width"]  # vit_ti16's preset width is 192
  with pytest.raises(ValueError, match=r"hidden_size=32.*"
                     r"config.student.name='vit_ti16' gives width=192"):
    kd.validate_student(config)
  config = _config(hf_vit[0])
  config.student.name = "resnet18"
  config.student.overrides = dict(image_size=S)
  with pytest.raises(ValueError, match=r"'vit' model.*'resnet18' is a ResNet"):
    kd.validate_student(config)


def test_missing_folder_named(tmp_path):
  missing = str(tmp_path / "no_such_vit")
  with pytest.raises(ValueError, match=r"hf_path=.*no_such_vit.*not a folder"):
    kd.validate_student(_config(missing))
  with pytest.raises(ValueError, match=r"config.json not found"):
    kd.validate_student(_config(str(tmp_path)))
