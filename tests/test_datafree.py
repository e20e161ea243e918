"""Data-free adversarial distillation: losses, steps and a short run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax import losses
from edgevl_jax.losses import datafree
from edgevl_jax.models import layers

S = jnp.array([[[1.0, 2.0]], [[3.0, 0.0]]])  # (H=2, B=1, K=2)
T = jnp.array([[[0.0, 0.0]], [[1.0, 1.0]]])


def test_student_loss_matches_hand_computed_value():
  fs = jnp.array([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
  ft = jnp.array([[[0.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])
  # kd = mean(1.5, 1.5); ens = mean(|2-.5|, |1-.5|) = 1; feat = mean(1, 2).
  loss, terms = losses.datafree_student_loss(
      student_logits=S, teacher_logits=T, student_features=fs,
      teacher_features=ft)
  np.testing.assert_allclose(terms["kd"], 1.5)
  np.testing.assert_allclose(terms["ens"], 1.0)
  np.testing.assert_allclose(terms["feat"], 1.5)
  np.testing.assert_allclose(loss, 1.5 + 0.2 * 1.5 + 5.0 * 1.0, rtol=1e-6)
  # Feature sizes differ -> no feature term; w_ens = 1 at 224 px.
  loss, _ = datafree.datafree_student_loss(
      student_logits=S, teacher_logits=T, student_features=fs,
      teacher_features=ft[..., :2], w_ens=1.0)
  np.testing.assert_allclose(loss, 2.5, rtol=1e-6)


def test_generator_loss_matches_hand_computed_value():
  loss, terms = losses.datafree_generator_loss(
      student_logits=S, teacher_logits=T, bn_losses=jnp.array([2.0, 4.0]))
  np.testing.assert_allclose(terms["adv"], 1.5)
  np.testing.assert_allclose(terms["bn"], 3.0)
  np.testing.assert_allclose(loss, -1.5 + 0.1 * 3.0, rtol=1e-6)


def test_bn_statistics_loss_matches_hand_computed_value():
  batch = [(jnp.zeros(2), jnp.ones(2)), (jnp.ones(1), jnp.array([2.0]))]
  running = [(jnp.array([3.0, 4.0]), jnp.ones(2)), (jnp.ones(1), jnp.zeros(1))]
  # Layer 0: ||(3,4)|| = 5, rho 5 -> 25; layer 1: ||2|| = 2 (norms unsquared).
  np.testing.assert_allclose(
      losses.bn_statistics_loss(batch_moments=batch, running_moments=running),
      27.0, rtol=1e-6)
  np.testing.assert_allclose(
      datafree.bn_statistics_loss(batch_moments=batch, running_moments=running,
                                  first_layer_weight=1.0), 7.0, rtol=1e-6)


def test_loss_errors_name_the_problem():
  with pytest.raises(ValueError, match="heads, batch, classes"):
    datafree.datafree_student_loss(student_logits=S[0], teacher_logits=T[0])
  with pytest.raises(ValueError, match="bn_losses"):
    datafree.datafree_generator_loss(
        student_logits=S, teacher_logits=T, bn_losses=jnp.ones(3))
  with pytest.raises(ValueError, match="same, non-zero"):
    datafree.bn_statistics_loss(batch_moments=[], running_moments=[])


class _TwoBN(nn.Module):
  """Names sort opposite to call order, to test the execution order."""

  @nn.compact
  def __call__(self, x):
    x = layers.BatchNorm(name="z_first")(x, use_running_average=True)
    x = layers.conv(3, (1, 1), ops=layers.Ops(), name="conv")(x)
    return layers.BatchNorm(name="a_second")(x, use_running_average=True)


def test_teacher_bn_moments_pairs_layers_in_execution_order():
  m = _TwoBN()
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2)) * 2.0 + 1.0
  variables = m.init(jax.random.key(1), x)
  _, mutated = m.apply(variables, x, mutable=[layers.BN_STATS])
  batch, running = datafree.teacher_bn_moments(
      mutated[layers.BN_STATS], variables["batch_stats"])
  assert [b[0].shape for b in batch] == [(2,), (3,)]
  np.testing.assert_allclose(batch[0][0], x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(batch[0][1], x.var((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(running[0][1], np.ones(2))
  with pytest.raises(ValueError, match="running statistics"):
    datafree.teacher_bn_moments(mutated[layers.BN_STATS], {})


# --- steps and a short run on tiny random teachers --------------------------

import ml_collections  # noqa: E402

from edgevl_jax.models import multihead  # noqa: E402
from edgevl_jax.models import students  # noqa: E402
from edgevl_jax.models import generator as generator_lib  # noqa: E402
from edgevl_jax.datafree import iteration as datafree_kd  # noqa: E402
from edgevl_jax.datafree import teachers as teachers_lib  # noqa: E402
from edgevl_jax.run import mesh as mesh_lib  # noqa: E402

_TRUNK = dict(stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=4,
              cifar_stem=True, image_size=16)
_K = 4


def _setup(batch_size=16, **loss):
  config = ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch_size, epochs=4, iters_per_epoch=5,
      student_steps=5, fused_iteration=None,
      student_optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="step", milestones=(3,)),
      generator_optim=dict(name="adam", lr=1e-3, schedule="step",
                           milestones=(3,)),
      generator=dict(image_size=32),
      loss=dict(w_feat=0.2, w_ens=5.0, w_bn=0.1, bn_first_weight=5.0, **loss)))
  mesh = mesh_lib.make_mesh()
  teacher = students.build("resnet18", embed_dim=_K, **_TRUNK)
  images = jnp.zeros((1, 16, 16, 3))
  stacked = jax.tree.map(
      lambda *xs: jnp.stack(xs),
      *[teacher.init(jax.random.key(10 + i, impl="rbg"), images,
                     mutable=["params", "batch_stats"]) for i in range(2)])
  stacked = nn.unbox(stacked)
  student = multihead.build("resnet18", num_heads=2, num_classes=_K, **_TRUNK)
  gen = generator_lib.DeconvGenerator(start_size=1, channels=(8, 8, 8, 8, 8),
                                      nz=16)
  config.generator.image_size = 16
  state, state_sh = datafree_kd.create_state(config, student, gen, mesh)
  steps = datafree_kd.make_steps(config, student, gen, teacher, mesh)
  return config, state, state_sh, steps, stacked, mesh


def _changed(a, b):
  return [not np.array_equal(x, y) for x, y in
          zip(jax.tree.leaves(a), jax.tree.leaves(b))]


@pytest.mark.slow
def test_each_step_moves_only_its_own_parameters():
  _, state, _, steps, teachers, _ = _setup()
  key = jax.random.key(3, impl="rbg")
  s, g = state.student, state.generator
  before_s, before_g = jax.device_get((s.variables, g.variables))
  new_g, metrics = jax.jit(steps.generator_step)(g, s.variables, teachers, key)
  assert np.isfinite(float(metrics["generator_loss"]))
  assert all(_changed(before_g["params"], jax.device_get(new_g.params)))
  new_s, metrics = jax.jit(steps.student_step)(s, g.variables, teachers, key)
  assert np.isfinite(float(metrics["student_loss"]))
  assert any(_changed(before_s["params"], jax.device_get(new_s.params)))
  # Neither step touched the other network (params or batch statistics).
  assert not any(_changed(before_s, jax.device_get(s.variables)))
  assert not any(_changed(before_g, jax.device_get(g.variables)))
  # Gradient of the generator loss exists for the generator only: the
  # student step's gradient never reaches the generator.
  assert int(new_g.step) == 1 and int(new_s.step) == 1


@pytest.mark.slow
def test_short_run_raises_agreement_with_teachers():
  config, state, state_sh, steps, teachers, mesh = _setup()
  # Agreement is measured on one fixed batch of 128 samples of the initial
  # generator: the per-step training batches are only 16 images and are
  # chosen adversarially by the generator, so their agreement is noise.
  teacher = students.build("resnet18", embed_dim=_K, **_TRUNK)
  student = multihead.build("resnet18", num_heads=2, num_classes=_K, **_TRUNK)
  gen = generator_lib.DeconvGenerator(start_size=1, channels=(8, 8, 8, 8, 8),
                                      nz=16)
  z = jax.random.normal(jax.random.key(7), (128, gen.nz))
  images = generator_lib.sample(gen, state.generator.variables, z)
  t_logits, _, _ = teachers_lib.teachers_forward(teacher, teachers, images)
  t_class = np.asarray(jnp.argmax(jnp.mean(t_logits, 0), -1))

  def agreement(s):
    out, _ = student.apply(s.variables, images, train=True,
                           mutable=["batch_stats"])
    return float(np.mean(np.asarray(jnp.argmax(out["logits"], -1)) == t_class))

  before = agreement(state.student)
  step = datafree_kd.compile_iteration(config, steps, state_sh, mesh)
  losses_ = []
  for _ in range(12):
    state, metrics = step(state, teachers)
    losses_.append(float(metrics["student_loss"]))
  assert int(state.step) == 12 and int(state.student.step) == 60
  assert np.mean(losses_[-3:]) < np.mean(losses_[:3])
  assert agreement(state.student) > before + 0.1


@pytest.mark.slow
def test_fused_and_split_iterations_give_the_same_update():
  config, state, state_sh, steps, teachers, mesh = _setup(batch_size=8)
  config.student_steps = 2
  results = []
  for fused in (True, False):
    config.fused_iteration = fused
    copy = jax.tree.map(jnp.copy, state)  # each iteration donates its input
    new, metrics = datafree_kd.compile_iteration(
        config, steps, state_sh, mesh)(copy, teachers)
    results.append((jax.device_get(new), jax.device_get(metrics)))
  (fused_state, fused_m), (split_state, split_m) = results
  assert int(split_state.step) == 1 and int(split_state.student.step) == 2
  np.testing.assert_allclose(fused_m["student_loss"], split_m["student_loss"],
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(fused_state.student.params),
                  jax.tree.leaves(split_state.student.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Generator: compare its images, not its parameters. Conv biases before a
  # BatchNorm have a zero true gradient, and Adam turns float noise in it
  # into +-lr steps of either sign; BN cancels those biases in the output.
  gen = generator_lib.DeconvGenerator(start_size=1, channels=(8, 8, 8, 8, 8),
                                      nz=16)
  z = jax.random.normal(jax.random.key(5), (8, gen.nz))
  np.testing.assert_allclose(
      generator_lib.sample(gen, fused_state.generator.variables, z),
      generator_lib.sample(gen, split_state.generator.variables, z),
      rtol=1e-3, atol=1e-4)
  # The update is not a no-op (so agreement above is not trivial).
  assert any(_changed(jax.device_get(state.student.params),
                      split_state.student.params))


def test_attention_aggregation_is_softmax_weighted_sum_of_heads():
  agg = multihead.AttentionAggregator()
  head_logits = jax.random.normal(jax.random.key(0), (3, 5, 4))
  params = nn.unbox(agg.init(jax.random.key(1), head_logits))["params"]
  logits, weights = agg.apply({"params": params}, head_logits)
  w, b = params["fc"]["kernel"][:, 0], params["fc"]["bias"][0]
  scores = head_logits @ w + b  # (H, B): one Linear(K -> 1) shared by heads
  expected_w = np.exp(scores) / np.exp(scores).sum(0)
  np.testing.assert_allclose(weights, expected_w, rtol=1e-5)
  np.testing.assert_allclose(
      logits, (expected_w[..., None] * head_logits).sum(0), rtol=1e-5)


_DIGITS_WITHOUT_TF = r"""
import importlib.abc, importlib.machinery, sys

class _Refuse(importlib.abc.Loader):
  def create_module(self, spec):
    raise ImportError("tensorflow is blocked")
  def exec_module(self, module):
    raise ImportError("tensorflow is blocked")

class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return importlib.machinery.ModuleSpec(name, _Refuse())
    return None

sys.meta_path.insert(0, _Block())
import numpy as np
from edgevl_jax.data import sklearn_digits
train = sklearn_digits.load("train", data_dir=sys.argv[1])
test = sklearn_digits.load("test", data_dir=sys.argv[1])
assert "tensorflow" not in sys.modules
print(train.images.shape, test.images.shape, train.images.dtype,
      np.bincount(train.labels).min(), np.bincount(test.labels).min(),
      len(np.intersect1d(train.images.reshape(len(train.images), -1)[:, 0],
                         [])))
"""


def test_digits_builder_prepares_without_tensorflow(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, "-c", _DIGITS_WITHOUT_TF, str(tmp_path)],
      capture_output=True, text=True, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  shapes = out.stdout.strip().splitlines()[-1]
  # 1797 images split 80/20, stratified: every class in both splits.
  assert shapes.startswith("(1437, 32, 32, 3) (360, 32, 32, 3) uint8"), shapes
  per_class_min = [int(v) for v in shapes.split()[-3:-1]]
  assert per_class_min[0] >= 130 and per_class_min[1] >= 30


@pytest.mark.slow
def test_quick_default_pipeline_writes_report_and_samples(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "configs"))
  import datafree_kd as datafree_config  # pylint: disable=g-import-not-at-top
  from edgevl_jax import main  # pylint: disable=g-import-not-at-top
  config = datafree_config.get_config(f"quick,data_dir={tmp_path / 'tfds'}")
  report = main.run(config, str(tmp_path / "run"))
  acc = report["accuracy"]
  for key in ("teacher_ensemble", "student_mean_heads", "student_attention"):
    assert 0.0 <= acc[key] <= 1.0
  assert len(acc["teacher_each"]) == 2 and len(acc["student_each_head"]) == 2
  assert acc["teacher_ensemble"] > 0.5  # real teachers, trained one epoch
  assert os.path.getsize(tmp_path / "run" / report["samples_path"]) > 0
  assert report["stages"]["datafree_kd"]["iterations"] == 4
