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
