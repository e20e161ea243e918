"""Layer primitives shared by every model: the quantisation injection point.

Every matmul and conv in edgevl_jax goes through these helpers, so that AQT
(or any other dot_general / einsum / conv implementation) is injected from
outside through one `Ops` value, without forking a model (the pattern of the
AQT Flax examples). `Ops()` means plain `lax` ops.

Parameters carry logical axis names (see `LOGICAL_AXIS_RULES`) so that
`flax.linen.logical_to_mesh_sharding` can lay a large teacher out over a mesh
with `data` and `fsdp` axes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axis names used by model parameters and activations.
BATCH = "batch"
EMBED = "embed"  # model width (d_model, channels of a transformer)
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # attention heads * head_dim (fused q/k/v output)
VOCAB = "vocab"  # token vocabulary
CONV_IN = "conv_in"  # conv input channels
CONV_OUT = "conv_out"  # conv output channels
CLASSES = "classes"  # classifier outputs / projection outputs
NORM = "norm"  # LayerNorm / BatchNorm scale and bias

# Default logical -> mesh axis rules: the batch goes over every data-parallel
# axis; weights are FSDP-sharded along their model width so a 1 B-parameter
# teacher fits; small tensors are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP, None),
    (HEADS, None),
    (VOCAB, None),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (CLASSES, None),
    (NORM, None),
)

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): the conv
# init of the torchvision-style CNNs (ResNet, MobileNetV2, WRN, SepConv).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PlainEinsum(nn.Module):
  """`jnp.einsum` with the AqtEinsum call signature `(eqn, lhs, rhs)`."""

  @nn.compact
  def __call__(self, eqn: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, lhs, rhs)


@dataclasses.dataclass(frozen=True)
class Ops:
  """Injected matmul/conv implementations; `None` means the plain lax op.

  Attributes:
    dot_general_cls: zero-arg factory of a dot_general module for weight
      matmuls (every Dense: qkv, attention out, MLP, heads). Passed as
      `nn.Dense(dot_general_cls=...)`; the kernel is the rhs.
    einsum_cls: zero-arg factory of an einsum module called as
      `(eqn, lhs, rhs)` for activation x activation matmuls (attention
      q k^T and attn v). Defaults to `PlainEinsum`.
    conv_general_dilated_cls: zero-arg factory for convolutions, passed as
      `nn.Conv(conv_general_dilated_cls=...)`.
  """

  dot_general_cls: Callable[[], Any] | None = None
  einsum_cls: Callable[[], Any] | None = None
  conv_general_dilated_cls: Callable[[], Any] | None = None


def dense(
    features: int,
    *,
    ops: Ops,
    axes: tuple[str | None, str | None],
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    kernel_init: Callable = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Dense:
  """A Dense layer routed through `ops.dot_general_cls`, params float32.

  Args:
    features: output width.
    ops: injected ops.
    axes: logical names of the (in, out) kernel dims, e.g. (EMBED, MLP).
    dtype: compute dtype (params stay float32).
  """
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
      dot_general_cls=ops.dot_general_cls,
      name=name,
  )


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    ops: Ops,
    strides: Sequence[int] | int = 1,
    padding: Any = "SAME",
    feature_group_count: int = 1,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    kernel_init: Callable = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Conv:
  """An NHWC Conv routed through `ops.conv_general_dilated_cls`."""
  axes = (None,) * len(kernel_size) + (CONV_IN, CONV_OUT)
  return nn.Conv(
      features,
      tuple(kernel_size),
      strides=strides,
      padding=padding,
      feature_group_count=feature_group_count,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
      conv_general_dilated_cls=ops.conv_general_dilated_cls,
      name=name,
  )


def einsum(*, ops: Ops, name: str | None = None) -> nn.Module:
  """The module for activation x activation matmuls (attention)."""
  factory = ops.einsum_cls or PlainEinsum
  if name is None:
    return factory()
  return factory(name=name)


def layer_norm(
    *, epsilon: float, dtype: Any = jnp.float32, name: str | None = None
) -> nn.LayerNorm:
  """LayerNorm with logically named float32 params (never quantised)."""
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
      name=name,
  )


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  Uses the 'dropout' rng; identity when `deterministic` or rate == 0.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


# Collection into which `BatchNorm` sows the batch statistics of its input.
BN_STATS = "bn_stats"


class BatchNorm(nn.Module):
  """BatchNorm that also records the moments of its input.

  When the `bn_stats` collection is mutable, each call sows
  `(batch_mean, batch_var)` of its input (biased variance over all axes but
  the last), which is what the data-free BN-statistics loss compares with the
  running statistics. Otherwise it is a plain `nn.BatchNorm` (PyTorch-style
  momentum 0.1 means flax momentum 0.9).

  Attributes:
    momentum: flax running-average decay (0.9 == PyTorch momentum 0.1).
    epsilon: added to the variance.
    use_scale, use_bias: affine parameters.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    if self.is_mutable_collection(BN_STATS):
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      self.sow(BN_STATS, "input_moments", (mean, var))
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=self.momentum,
        epsilon=self.epsilon,
        use_scale=self.use_scale,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
        name="bn",
    )(x)
