"""Losses of data-free adversarial distillation (CDFKD-MFS, Hao et al. 2022).

H teachers, one student head per teacher. `L1` below is the mean absolute
error over batch x classes.

Student step (minimised by the student):
  L_S = mean_h L1(s_h, t_h)
        + w_feat * mean_h mean_b sum_d |f_s,h - f_t,h|
        + w_ens * L1(mean_h s_h, mean_h t_h)
Generator step (minimised by the generator; no ensemble term):
  L_G = sum_i [ -L1(s_i, t_i) / H + w_bn * (sum_l rho_l * r_l,i) / H ]
  r_l,i = ||var_running - var_batch||_2 + ||mean_running - mean_batch||_2
at the input of BatchNorm layer l of teacher i (norms not squared, rho = 5
for the first BN layer of a teacher, 1 for the others).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp



def _check_logits(student: jax.Array, teacher: jax.Array) -> None:
  if student.ndim != 3 or student.shape != teacher.shape:
    raise ValueError(
        "student and teacher logits must both have shape (heads, batch, "
        f"classes) and match; found student {tuple(student.shape)} and "
        f"teacher {tuple(teacher.shape)}. Stack per-head/per-teacher logits "
        "on axis 0.")


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean absolute error over all but the leading (head) axis: (H,)."""
  return jnp.mean(jnp.abs(a - b).reshape(a.shape[0], -1), axis=1)


def datafree_student_loss(
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_features: jax.Array | None = None,
    teacher_features: jax.Array | None = None,
    w_feat: float = 0.2,
    w_ens: float = 5.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Student loss L_S of CDFKD-MFS.

  Args:
    student_logits: (H, B, K) logits of the H student heads.
    teacher_logits: (H, B, K) logits of the H teachers (head h mimics
      teacher h).
    student_features: (H, B, D) pooled features of each head, or None.
    teacher_features: (H, B, D') pooled features of each teacher, or None.
      The feature term is 0 when either is None or D != D' (as in the paper).
    w_feat: weight of the feature term (0.2 in the paper).
    w_ens: weight of the ensemble term (5; 1 for 224 px).

  Returns:
    (scalar loss, {'kd': ..., 'feat': ..., 'ens': ...}) with the unweighted
    terms.
  """
  _check_logits(student_logits, teacher_logits)
  kd = jnp.mean(_l1(student_logits, teacher_logits))
  ens = jnp.mean(jnp.abs(jnp.mean(student_logits, 0)
                         - jnp.mean(teacher_logits, 0)))
  feat = jnp.zeros((), jnp.float32)
  if (student_features is not None and teacher_features is not None
      and student_features.shape == teacher_features.shape):
    feat = jnp.mean(jnp.sum(jnp.abs(student_features - teacher_features), -1))
  loss = kd + w_feat * feat + w_ens * ens
  return loss, {"kd": kd, "feat": feat, "ens": ens}


def datafree_generator_loss(
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    bn_losses: jax.Array,
    w_bn: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Generator loss L_G of CDFKD-MFS (adversarial + BN statistics).

  Args:
    student_logits: (H, B, K) logits of the student heads on generated images.
    teacher_logits: (H, B, K) logits of the teachers on the same images.
    bn_losses: (H,) per-teacher BN-statistics loss sum_l rho_l r_l,i (see
      `bn_statistics_loss`).
    w_bn: weight of the BN-statistics term (0.1 in the paper).

  Returns:
    (scalar loss, {'adv': sum_i L1_i / H, 'bn': sum_i bn_i / H}).
  """
  _check_logits(student_logits, teacher_logits)
  num_heads = student_logits.shape[0]
  if bn_losses.shape != (num_heads,):
    raise ValueError(
        f"bn_losses must have shape (heads,) = ({num_heads},); found "
        f"{tuple(bn_losses.shape)}. Pass one bn_statistics_loss per teacher.")
  adv = jnp.sum(_l1(student_logits, teacher_logits)) / num_heads
  bn = jnp.sum(bn_losses) / num_heads
  return -adv + w_bn * bn, {"adv": adv, "bn": bn}


def bn_statistics_loss(
    *,
    batch_moments: Sequence[tuple[jax.Array, jax.Array]],
    running_moments: Sequence[tuple[jax.Array, jax.Array]],
    first_layer_weight: float = 5.0,
) -> jax.Array:
  """BN-statistics loss of one teacher: sum_l rho_l * r_l.

  r_l = ||var_running - var_batch||_2 + ||mean_running - mean_batch||_2
  (Euclidean norms, not squared); rho_0 = `first_layer_weight`, rho_l = 1
  for l > 0.

  Args:
    batch_moments: per BN layer in execution order, (mean, var) of the
      layer's input on the current batch, each (C_l,); var is biased.
    running_moments: per BN layer, the layer's running (mean, var), (C_l,).
    first_layer_weight: rho of the first BN layer (5 in the paper).

  Returns:
    Scalar loss.
  """
  if len(batch_moments) != len(running_moments) or not batch_moments:
    raise ValueError(
        "batch_moments and running_moments must list the same, non-zero "
        f"number of BN layers; found {len(batch_moments)} and "
        f"{len(running_moments)}. Collect both with teacher_bn_moments(...).")
  total = jnp.zeros((), jnp.float32)
  for l, ((bm, bv), (rm, rv)) in enumerate(zip(batch_moments, running_moments)):
    rho = first_layer_weight if l == 0 else 1.0
    r = jnp.linalg.norm(rv - bv) + jnp.linalg.norm(rm - bm)
    total = total + rho * r
  return total


def teacher_bn_moments(
    bn_stats: Any, batch_stats: Any
) -> tuple[list[tuple[jax.Array, jax.Array]],
           list[tuple[jax.Array, jax.Array]]]:
  """Pairs the sown input moments of `layers.BatchNorm` with running stats.

  `layers.BatchNorm` at path P sows `bn_stats[P]['input_moments'] =
  ((mean, var),)` and keeps its running stats at `batch_stats[P]['bn']`.
  Flax builds the sown collection as nested dicts in call order, so walking
  it in insertion order (not jax.tree order, which sorts keys) lists the BN
  layers in execution order: the first one is the teacher's first BN.

  Args:
    bn_stats: the mutated `bn_stats` collection of one teacher apply.
    batch_stats: that teacher's `batch_stats` collection.

  Returns:
    (batch_moments, running_moments), aligned lists of (mean, var).
  """
  batch, running = [], []

  def walk(stats: Any, running_node: Any, path: str) -> None:
    for key, value in stats.items():
      if key == "input_moments":
        if "bn" not in running_node:
          raise ValueError(
              f"no running statistics at batch_stats{path}/bn for the BN "
              "input moments sown there; pass the same teacher's "
              "batch_stats collection.")
        batch.append(tuple(value[-1]))
        running.append((running_node["bn"]["mean"], running_node["bn"]["var"]))
      else:
        walk(value, running_node.get(key, {}), f"{path}/{key}")

  walk(bn_stats, batch_stats, "")
  return batch, running
