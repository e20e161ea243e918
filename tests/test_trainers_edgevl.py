"""EdgeVL trainer steps on tiny models: losses fall, shapes and trees hold."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from edgevl_jax import quant
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.models import clip
from edgevl_jax.models import students
from edgevl_jax.jobs import clip_pretrain
from edgevl_jax.jobs import dual_modality_kd as kd
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.edgevl import clip_teacher
from edgevl_jax.edgevl import curation
from edgevl_jax.jobs import qat_contrastive
from edgevl_jax.run import registry
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

S = 16
TINY_CLIP = ml_collections.ConfigDict(dict(
    vision_width=32, vision_layers=1, vision_heads=2, patch_size=4,
    text_width=32, text_layers=1, text_heads=2, projection_dim=16,
    max_length=8, vocab_size=300, hidden_act="gelu"))
TINY_STUDENT = dict(image_size=S, patch_size=4, width=32, depth=1,
                    num_heads=2, drop_path_rate=0.0)
OPTIM = ml_collections.ConfigDict(dict(name="adamw", lr=3e-3,
                                       schedule="constant"))


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh()


@pytest.fixture(scope="module")
def teacher():
  model = clip.CLIP(config=clip_teacher.build_hf_config(
      TINY_CLIP, image_size=S, vocab_size=300))
  return model, clip.init_params(model, jax.random.key(0))


def _images(key, n):
  return jax.random.uniform(key, (n, S, S, 3))


def _run(step, state, batch, n, extra=()):
  losses = []
  for _ in range(n):
    state, m = step(state, *extra, batch)
    losses.append(float(m["loss"]))
  return state, losses


def _student_state(mesh, model, params=None, rules=mesh_lib.REPLICATED_RULES):
  tx = optim_lib.make_optimizer(OPTIM, 100)
  init = (lambda k: model.init(k, jnp.zeros((1, S, S, 3)))) if params is None \
      else (lambda k: {"params": params})
  return state_lib.create_train_state(init, tx, jax.random.key(1), mesh=mesh,
                                      rules=rules)


@pytest.mark.parametrize("kind,mode", [("l1", "both"), ("cosine", "rgb")])
def test_kd_step_loss_falls_sharded(mesh, teacher, kind, mode):
  t_model, t_params = teacher
  model = students.build("vit_ti16", embed_dim=16, **TINY_STUDENT)
  state, state_sh = _student_state(mesh, model)
  norm = handoff.normalizer("clip")
  step = mesh_lib.jit_sharded(
      kd.make_train_step(model, t_model, kind=kind, mode=mode, t_norm=norm,
                         s_norm=norm),
      in_shardings=(state_sh, mesh_lib.replicated(mesh),
                    mesh_lib.batch_sharding(mesh)),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  k1, k2 = jax.random.split(jax.random.key(2))
  batch = mesh_lib.shard_batch({"rgb": np.asarray(_images(k1, 8)),
                                "other": np.asarray(_images(k2, 8))}, mesh)
  state, losses = _run(step, state, batch, 12, (t_params,))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 12


def test_kd_cached_teacher_equals_inline(mesh, teacher):
  t_model, t_params = teacher
  model = students.build("vit_ti16", embed_dim=16, **TINY_STUDENT)
  norm = handoff.normalizer("clip")
  step = jax.jit(kd.make_train_step(model, t_model, kind="l1", mode="both",
                                    t_norm=norm, s_norm=norm))
  k1, k2 = jax.random.split(jax.random.key(3))
  batch = {"rgb": _images(k1, 8), "other": _images(k2, 8)}
  cached = dict(batch, teacher=t_model.apply(
      {"params": t_params}, norm(batch["rgb"]), method="encode_image"))
  state, _ = _student_state(mesh, model)
  _, m_inline = step(state, t_params, batch)
  _, m_cached = step(state, None, cached)
  np.testing.assert_allclose(m_inline["loss"], m_cached["loss"], rtol=1e-5)


def test_clip_step_loss_falls(mesh, teacher):
  t_model, _ = teacher
  tx = optim_lib.make_optimizer(OPTIM, 100)
  ids = jnp.ones((1, 8), jnp.int32)
  state, sh = state_lib.create_train_state(
      lambda k: t_model.init(k, jnp.zeros((1, S, S, 3)), ids, ids), tx,
      jax.random.key(0), mesh=mesh)
  step = jax.jit(clip_pretrain.make_train_step(t_model,
                                               handoff.normalizer("clip")))
  rs = np.random.default_rng(0)
  batch = {"rgb": _images(jax.random.key(4), 8),
           "input_ids": jnp.asarray(rs.integers(2, 300, (8, 8)), jnp.int32),
           "attention_mask": jnp.ones((8, 8), jnp.int32)}
  _, losses = _run(step, state, batch, 10)
  assert losses[-1] < 0.5 * losses[0], losses
  del sh


def _triplet_batch(key, b=4, k=3):
  k1, k2 = jax.random.split(key)
  mask = np.ones((b, 2 + k), bool)
  mask[0, -1] = False  # one missing negative
  return {"rgb": jax.random.uniform(k1, (b, 2 + k, S, S, 3)),
          "other": jax.random.uniform(k2, (b, 2 + k, S, S, 3)),
          "mask": jnp.asarray(mask)}


def test_qat_step_int8_params_tree_equals_fp32_and_loss_falls(mesh):
  fp32 = students.build("vit_ti16", embed_dim=16, **TINY_STUDENT)
  params = nn.unbox(fp32.init(jax.random.key(0),
                              jnp.zeros((1, S, S, 3))))["params"]
  q = students.build("vit_ti16", embed_dim=16, quant=quant.int8(),
                     **TINY_STUDENT)
  state, _ = _student_state(mesh, q, params=params)
  step = jax.jit(qat_contrastive.make_train_step(
      q, handoff.normalizer("clip"), margin=0.3, online=False))
  batch = _triplet_batch(jax.random.key(5))
  new_state, losses = _run(step, state, batch, 8)
  assert (jax.tree.structure(new_state.params)
          == jax.tree.structure(params))
  assert jax.tree.map(jnp.shape, new_state.params) == jax.tree.map(
      jnp.shape, params)
  assert np.isfinite(losses).all() and losses[0] > 0
  assert losses[-1] < losses[0], losses


def test_qat_online_step_loss_falls(mesh):
  q = students.build("vit_ti16", embed_dim=16, quant=quant.int8(),
                     **TINY_STUDENT)
  state, _ = _student_state(mesh, q)
  step = jax.jit(qat_contrastive.make_train_step(
      q, handoff.normalizer("clip"), margin=0.3, online=True))
  k1, k2 = jax.random.split(jax.random.key(6))
  batch = {"rgb": _images(k1, 16), "other": _images(k2, 16),
           "pseudo_label": jnp.arange(16) % 4}
  _, losses = _run(step, state, batch, 10)
  assert losses[-1] < losses[0], losses


def test_curate_keeps_most_confident():
  p = np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8]])
  kept, labels, conf = curation.curate(p, 0.5)
  np.testing.assert_array_equal(kept, [0, 3])
  np.testing.assert_array_equal(labels, [0, 1, 0, 1])
  np.testing.assert_allclose(conf, [0.9, 0.7, 0.5, 0.8])


def test_topk_accuracy_hand_computed():
  text = np.eye(3, dtype=np.float32)
  img = np.array([[1, .5, 0], [0, .2, 1], [.4, 0, 1]], np.float32)
  acc = zero_shot.topk_accuracy(img, text, np.array([1, 2, 0]), ks=(1, 2, 5))
  assert acc["top1"] == pytest.approx(1 / 3)
  assert acc["top2"] == pytest.approx(1.0)
  assert acc["top5"] == 1.0


def _kd_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      trainer="dual_modality_kd", dataset="synthetic_rgbd", data_dir="/tmp/x",
      teacher="@clip_pretrain/teacher_path", seed=0, eval_batch_size=8,
      image_size=S, batch_size=8, num_steps=2, eval_every=2,
      teacher_normalization="clip", kd_loss="l1", student_inputs="both",
      student_sharding="replicated", teacher_cache=dict(num_views=0),
      student=dict(name="vit_ti16", normalization="clip",
                   overrides=dict(TINY_STUDENT)), optim=OPTIM.to_dict()))
  c.update(overrides)
  return c


def test_validate_config_names_bad_keys():
  registry.validate(_kd_config())
  with pytest.raises(ValueError, match="student_inputs"):
    registry.validate(_kd_config(student_inputs="depth_only"))
  with pytest.raises(ValueError, match="kd_loss"):
    registry.validate(_kd_config(kd_loss="huber"))
  bad = _kd_config()
  bad.student.overrides.image_size = 32
  with pytest.raises(ValueError, match="image_size"):
    registry.validate(bad)
  with pytest.raises(ValueError, match=r"config\.kd_los is not a key of "
                     "this job"):
    registry.validate(_kd_config(kd_los="l2"))
  q = ml_collections.ConfigDict(dict(
      trainer="qat_contrastive", dataset="synthetic_rgbd", data_dir="/x", init_from="@kd/workdir",
      teacher="@t/teacher_path", seed=0, eval_batch_size=8,
      pseudo_labels="/p", image_size=S, batch_size=8, num_steps=2,
      eval_every=2, max_negatives=3, margin=0.3, mining="online",
      mining_space="unnormalized", quant="int8", optim=OPTIM.to_dict()))
  with pytest.raises(ValueError, match="mining_space"):
    registry.validate(q)


def test_demo_config_validates_every_stage():
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_cfg", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in (None, "quick"):
    config = module.get_config(arg)
    registry.validate(config)
    names = [s.name for s in config.stages]
    assert names == ["clip_pretrain", "pseudo_labels", "dual_modality_kd",
                     "qat_contrastive", "evaluate", "export"]
  config = module.get_config("seed=7")
  assert all(s.seed == 7 for s in config.stages)
  # One stage by name, through the CLI spelling --config.stages.NAME.key.
  from edgevl_jax import main as main_lib
  argv = main_lib.stage_names_to_indices(
      ["main", "--config=configs/demo.py:quick",
       "--config.stages.qat_contrastive.num_steps=3"])
  assert argv[-1] == "--config.stages[3].num_steps=3"
  with pytest.raises(ValueError, match="Unknown config arg"):
    module.get_config("epochs=3")


def test_text_sampler_prompts_and_determinism():
  from edgevl_jax.data import info as info_lib
  info = info_lib.get_info("synthetic_rgbd")
  draws = np.random.default_rng(0).random((16, 2)).astype(np.float32)
  batch = {"caption": np.array(["a red cube.", "a blue cone."] * 8),
           "label": np.array([1, 3] * 8), "index": np.arange(16),
           "text_draw": draws}
  assert clip_pretrain.TextSampler(info, 0.0)(batch) == list(
      batch["caption"])
  prompts = clip_pretrain.TextSampler(info, 1.0)(batch)
  assert all(info.class_names[l] in p for p, l in zip(prompts,
                                                      batch["label"]))
  half = clip_pretrain.TextSampler(info, 0.5)
  # The choice is the draw's: prompt exactly where u < 0.5.
  texts = half(batch)
  assert [t not in batch["caption"] for t in texts] == list(draws[:, 0] < 0.5)
  # A batch split over two processes picks the same texts per example.
  split = [half({k: v[i::2] for k, v in batch.items()}) for i in range(2)]
  assert split[0] == texts[0::2] and split[1] == texts[1::2]
  with pytest.raises(ValueError, match="text_draw"):
    half({**batch, "text_draw": draws[:3]})
