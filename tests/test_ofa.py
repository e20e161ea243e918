"""OFA-KD loss, vanilla KD, cross-entropy and OFA branch projectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax import losses
from edgevl_jax.models import ofa_branches


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_ofa_loss_hand_computed():
  s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], np.float32)
  t = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
  y = np.array([0, 2])
  gamma, temp = 2.0, 2.0
  p_t, p_s = _softmax(t / temp), _softmax(s / temp)
  # Row 0: target class 0 -> (p+1)^2 - 1; others p^2. Row 1: target 2.
  w = p_t**gamma
  w[0, 0] = (p_t[0, 0] + 1) ** gamma - 1
  w[1, 2] = (p_t[1, 2] + 1) ** gamma - 1
  want = -(w * np.log(p_s)).sum(-1).mean()
  got = losses.ofa_loss(logits_student=jnp.asarray(s),
                        logits_teacher=jnp.asarray(t),
                        target_labels=jnp.asarray(y), gamma=gamma,
                        temperature=temp)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # One-hot labels give the same value; gamma = 1 is soft-target CE.
  onehot = jax.nn.one_hot(y, 3)
  np.testing.assert_allclose(
      float(losses.ofa_loss(logits_student=s, logits_teacher=t,
                            target_labels=onehot, gamma=gamma,
                            temperature=temp)), want, rtol=1e-6)
  ce = -(p_t * np.log(p_s)).sum(-1).mean()
  np.testing.assert_allclose(
      float(losses.ofa_loss(logits_student=s, logits_teacher=t,
                            target_labels=y, temperature=temp)), ce, rtol=1e-5)


def test_ofa_gradient_moves_student_toward_teacher():
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.normal(size=(8, 5)) * 3, jnp.float32)
  y = jnp.argmax(t, -1)
  s = jnp.zeros((8, 5))
  loss = lambda s: losses.ofa_loss(logits_student=s, logits_teacher=t,
                                   target_labels=y, gamma=1.5)
  g = jax.grad(loss)(s)
  assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.sum(jax.grad(loss)(t))) == pytest.approx(0.0, abs=1e-5)
  before = float(losses.kl_distill(logits_student=s, logits_teacher=t,
                                   temperature=1.0))
  after = float(losses.kl_distill(logits_student=s - 1.0 * g,
                                  logits_teacher=t, temperature=1.0))
  assert after < before
  # Teacher gets no gradient even when gamma < 1 and p_t underflows.
  gt = jax.grad(lambda t: losses.ofa_loss(
      logits_student=s, logits_teacher=t * 100, target_labels=y,
      gamma=0.5))(t)
  assert not np.asarray(gt).any()
  with pytest.raises(ValueError, match="target_labels"):
    losses.ofa_loss(logits_student=s, logits_teacher=t, target_labels=y[:3])


def test_kl_distill_hand_computed_with_t_squared():
  s = np.array([[0.2, -0.3, 1.0], [2.0, 0.0, 0.0]], np.float32)
  t = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 1.0]], np.float32)
  temp = 4.0
  p_t, p_s = _softmax(t / temp), _softmax(s / temp)
  want = temp**2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
  got = losses.kl_distill(logits_student=s, logits_teacher=t,
                          temperature=temp)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(losses.kl_distill(logits_student=t, logits_teacher=t)) == (
      pytest.approx(0.0, abs=1e-6))
  with pytest.raises(ValueError, match="same"):
    losses.kl_distill(logits_student=s[:, :2], logits_teacher=t)


def test_softmax_cross_entropy():
  z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
  y = np.array([2, 0])
  want = -np.mean(np.log(_softmax(z)[[0, 1], y]))
  np.testing.assert_allclose(
      float(losses.softmax_cross_entropy(logits=z, labels=y)), want,
      rtol=1e-6)
  np.testing.assert_allclose(
      float(losses.softmax_cross_entropy(logits=z,
                                         labels=jax.nn.one_hot(y, 3))),
      want, rtol=1e-6)
  with pytest.raises(ValueError, match="integers"):
    losses.softmax_cross_entropy(logits=z, labels=np.array([2.0, 0.0]))


def test_branches_for_cnn_and_vit_stages():
  rng = jax.random.PRNGKey(0)
  cnn_shapes = ((2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64))
  vit_shapes = ((2, 17, 24),) * 3 + ((2, 17, 32),)
  for shapes, stages in ((cnn_shapes, (1, 2, 4)), (vit_shapes, (3, 4))):
    module = ofa_branches.OFABranches(shapes, stages=stages,
                                      num_classes=10, teacher_width=48)
    feats = [jax.random.normal(rng, s) for s in shapes]
    variables = jax.jit(module.init)(rng, feats)
    out = jax.jit(module.apply)(variables, feats)
    assert [o.shape for o in out] == [(2, 10)] * len(stages)
    assert all(np.isfinite(np.asarray(o)).all() for o in out)
  # Conv branch of stage 1 downsamples 16 -> 2 with three SepConvs and ends
  # with max(64, 48) channels.
  b = ofa_branches.make_branch(cnn_shapes[0], final_shape=cnn_shapes[-1],
                               num_classes=10, teacher_width=48)
  assert (b.num_downsamples, b.features) == (3, 64)
  # Token branch: 8x8 grid merged to 2x2 twice, max(4 - stage, 1) blocks.
  t1 = ofa_branches.make_branch((2, 65, 24), final_shape=(2, 5, 32),
                                num_classes=10, stage=1)
  assert (t1.num_merges, t1.num_blocks, t1.width) == (2, 3, 32)
  t = ofa_branches.make_branch((2, 65, 24), final_shape=(2, 5, 32),
                               num_classes=10, stage=3)
  x = jax.random.normal(rng, (2, 65, 24))
  assert jax.jit(t.apply)(jax.jit(t.init)(rng, x), x).shape == (2, 10)
  with pytest.raises(ValueError, match="got shape"):
    ofa_branches.make_branch((2, 3), final_shape=(2, 3), num_classes=2)


def test_branch_trains_to_teacher_logits():
  """A conv branch on fixed features learns to match the teacher."""
  import optax
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.normal(size=(32, 4, 4, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  teacher = jax.nn.one_hot(y, 3) * 4.0
  # Make the label recoverable from the feature.
  feats = feats.at[..., 0].add(2.0 * y[:, None, None])
  branch = ofa_branches.ConvBranch(3, 8, 1)
  variables = jax.jit(branch.init)(jax.random.PRNGKey(0), feats)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(p, stats):
    logits, upd = branch.apply({"params": p, "batch_stats": stats}, feats,
                               train=True, mutable=["batch_stats"])
    return losses.ofa_loss(logits_student=logits, logits_teacher=teacher,
                           target_labels=y, gamma=1.2), upd["batch_stats"]

  @jax.jit
  def step(p, o, stats):
    (l, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, stats, l

  first = None
  for _ in range(40):
    params, opt, stats, l = step(params, opt, stats)
    first = float(l) if first is None else first
  assert float(l) < 0.5 * first, (first, float(l))


def test_distill_classifier_student_and_loss_terms():
  import ml_collections
  from edgevl_jax.jobs import distill_classifier
  config = ml_collections.ConfigDict(dict(
      student=dict(name="vit_ti16", overrides=dict(
          image_size=16, patch_size=4, width=16, depth=4, num_heads=2,
          drop_path_rate=0.0)),
      ofa=dict(stages=[3], weight=0.5, gamma=1.5, temperature=1.0),
      ce_weight=1.0, kd_weight=2.0, kd="kl", kd_temperature=4.0))
  model = distill_classifier.build_student(config, 5, (16, 16, 3), True)
  x = jnp.zeros((3, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  logits, extra = jax.jit(model.apply)(variables, x)
  assert logits.shape == (3, 5) and [e.shape for e in extra] == [(3, 5)]
  teacher = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)),
                        jnp.float32)
  labels = jnp.array([0, 3, 4])
  total, parts = distill_classifier._losses(config, logits, extra, teacher,
                                            labels)
  want = (parts["ce_loss"] + 2.0 * parts["kd_loss"]
          + 0.5 * parts["ofa_loss"])
  np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
  np.testing.assert_allclose(
      float(parts["ofa_loss"]),
      float(losses.ofa_loss(logits_student=extra[0], logits_teacher=teacher,
                            target_labels=labels, gamma=1.5)), rtol=1e-6)
  plain = distill_classifier.build_student(config, 5, (16, 16, 3), False)
  assert plain.branches is None
  with pytest.raises(ValueError, match="holds no trained classifier"):
    distill_classifier.teacher_model_dir("/nonexistent")
