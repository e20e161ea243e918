"""Multi-header student: the shift-based depthwise conv matches lax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax.models import layers
from edgevl_jax.models import multihead
from edgevl_jax.models import sepconv


@pytest.mark.parametrize("size,channels,stride,padding", [
    (8, 4, 1, ((1, 1), (1, 1))),
    (8, 4, 2, ((1, 1), (1, 1))),
    (9, 3, 2, ((1, 1), (1, 1))),
    (7, 5, 2, ((0, 1), (1, 0))),
])
def test_shift_depthwise_conv_matches_lax_value_and_gradients(
    size, channels, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                      ("NHWC", "HWIO", "NHWC"))

  def ref(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dn,
        feature_group_count=channels)

  def shift(x, w):
    return sepconv.ShiftDepthwiseConv()(
        x, w, (stride, stride), padding, dimension_numbers=dn,
        feature_group_count=channels)

  np.testing.assert_allclose(jax.jit(shift)(x, w), jax.jit(ref)(x, w),
                             atol=1e-5)
  grads = lambda fn: jax.jit(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(fn(x, w))), (0, 1)))(x, w)
  for got, want in zip(grads(shift), grads(ref)):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_non_depthwise_conv_falls_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                      ("NHWC", "HWIO", "NHWC"))
  got = sepconv.ShiftDepthwiseConv()(
      x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  want = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_student_heads_shapes_and_injected_conv_is_respected():
  calls = []

  class Recording:
    def __call__(self, *args, **kwargs):
      calls.append(kwargs.get("feature_group_count", 1))
      return jax.lax.conv_general_dilated(*args, **kwargs)

  trunk = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16),
               stem_width=8, image_size=16)
  images = jnp.zeros((2, 16, 16, 3))
  student = multihead.build("resnet18", num_heads=2, num_classes=5, **trunk)
  # rbg keys: XLA:CPU compiles threefry initialisers slowly.
  variables = jax.jit(student.init)(jax.random.key(0, impl="rbg"), images)
  out = jax.jit(student.apply)(variables, images)
  assert out["head_logits"].shape == (2, 2, 5)
  assert out["logits"].shape == (2, 5)
  injected = multihead.MultiHeadStudent(
      student.trunk, 2, 5,
      ops=layers.Ops(conv_general_dilated_cls=Recording))
  injected.apply(variables, images)
  # 2 heads x 4 E blocks x 2 depthwise convs go through the injected conv.
  assert sum(1 for g in calls if g > 1) == 16
