"""Vanilla knowledge distillation (Hinton et al. 2015) and cross-entropy."""
import jax
import jax.numpy as jnp


def _check_logits(name_a: str, a: jax.Array, name_b: str,
                  b: jax.Array) -> None:
  if a.shape != b.shape or a.ndim < 1:
    raise ValueError(f"{name_a} and {name_b} must have the same (..., classes)"
                     f" shape; got {a.shape} and {b.shape}.")


def kl_distill(*, logits_student: jax.Array, logits_teacher: jax.Array,
               temperature: float = 4.0) -> jax.Array:
  """T^2 KL(p_t^T || p_s^T), averaged over examples (PyTorch 'batchmean').

  The T^2 factor keeps the gradient scale independent of T (Hinton et al.),
  so the KD weight need not be retuned with the temperature. The teacher is
  treated as a constant (stop_gradient).

  Args:
    logits_student: (..., C) student logits.
    logits_teacher: (..., C) teacher logits.
    temperature: softmax temperature T > 0.

  Returns:
    Scalar loss: T^2 * mean over leading axes of
    sum_c p_t(c) (log p_t(c) - log p_s(c)), with p = softmax(logits / T).
  """
  _check_logits("logits_student", logits_student, "logits_teacher",
                logits_teacher)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  t = jax.lax.stop_gradient(logits_teacher.astype(jnp.float32))
  log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(
      logits_student.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def softmax_cross_entropy(*, logits: jax.Array,
                          labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of (..., C) logits against labels.

  Args:
    logits: (..., C).
    labels: integer class ids (...) or one-hot / soft targets (..., C).

  Returns:
    Scalar mean over examples of -sum_c y_c log softmax(logits)_c.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if labels.ndim == logits.ndim - 1:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"Class-id labels must be integers, got dtype "
                       f"{labels.dtype}; pass int labels or (..., C) targets.")
    labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  elif labels.shape != logits.shape:
    raise ValueError(f"labels must be class ids of shape {logits.shape[:-1]} "
                     f"or targets of shape {logits.shape}; got "
                     f"{labels.shape}.")
  return -jnp.mean(jnp.sum(labels.astype(jnp.float32) * log_p, axis=-1))
