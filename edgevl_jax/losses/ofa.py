"""OFA-KD loss (Hao et al., NeurIPS 2023): KD with adaptive target enhancement.

The teacher distribution p_t (at temperature T) is reweighted before it is
used as a soft target: the target class c* gets (p_t(c*) + 1)^gamma - 1, every
other class p_t(c)^gamma. With gamma = 1 this is plain soft-target CE (KD
without the T^2 factor); gamma > 1 enlarges the target class relative to the
rest, more so when the teacher is unsure (small p_t(c*)), which is what lets a
heterogeneous student learn from an imperfect teacher. Loss:
  L = mean_i -sum_c w_ic log p_s(c | x_i).
"""
import jax
import jax.numpy as jnp


def ofa_loss(*, logits_student: jax.Array, logits_teacher: jax.Array,
             target_labels: jax.Array, gamma: float = 1.0,
             temperature: float = 1.0, eps: float = 1e-7) -> jax.Array:
  """OFA loss of student logits against a target-enhanced teacher.

  Args:
    logits_student: (B, C) student (or branch) logits.
    logits_teacher: (B, C) teacher logits (treated as constant).
    target_labels: (B,) integer ground-truth class ids, or (B, C) one-hot /
      smoothed labels (their argmax is the target class, as in OFA-KD).
    gamma: the exponent ("ofa_eps" in the OFA-KD code), > 0.
    temperature: softmax temperature for both distributions.
    eps: floor on teacher probabilities before the power, so that gamma < 1
      never raises 0 to a fractional power (infinite derivative).

  Returns:
    Scalar: mean over B of -sum_c w_c log softmax(logits_student / T)_c with
    w = (p_t + 1[c = y])^gamma - 1[c = y].
  """
  if logits_student.shape != logits_teacher.shape or logits_student.ndim != 2:
    raise ValueError(f"logits_student and logits_teacher must both be (B, C);"
                     f" got {logits_student.shape} and "
                     f"{logits_teacher.shape}.")
  num_classes = logits_student.shape[-1]
  if target_labels.ndim == 2:
    target_labels = jnp.argmax(target_labels, axis=-1)
  if target_labels.shape != logits_student.shape[:1]:
    raise ValueError(f"target_labels must be ({logits_student.shape[0]},) "
                     f"class ids or (B, C) labels; got "
                     f"{target_labels.shape}.")
  if not gamma > 0 or not temperature > 0:
    raise ValueError(f"gamma and temperature must be > 0; got gamma={gamma},"
                     f" temperature={temperature}.")
  mask = jax.nn.one_hot(target_labels, num_classes, dtype=jnp.float32)
  p_t = jax.nn.softmax(
      jax.lax.stop_gradient(logits_teacher.astype(jnp.float32)) / temperature,
      axis=-1)
  weights = jnp.power(jnp.maximum(p_t, eps) + mask, gamma) - mask
  log_p_s = jax.nn.log_softmax(
      logits_student.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.mean(jnp.sum(weights * log_p_s, axis=-1))
