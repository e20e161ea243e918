"""Image generators for data-free adversarial distillation (CDFKD-MFS).

A latent z ~ N(0, I) of size `nz` (256 in the paper) is mapped to an image in
NHWC layout. Three resolutions follow the paper's public code:

- `Generator32`: DCGAN-style, Linear -> 8x8x128 -> two (nearest upsample x2,
  conv3x3, BN, LeakyReLU 0.2) blocks -> conv3x3 to 3 channels -> tanh ->
  BN(3) without affine parameters.
- `Generator128` / `Generator224`: Linear -> 8x8x512 (14x14x512 for 224 px)
  -> BN -> four (ConvTranspose 4x4 stride 2, BN, LeakyReLU 0.2) blocks with
  channels 512->256->128->64->64 -> conv3x3 to 3 -> tanh (224 px adds a final
  BN(3) without affine parameters).

Every BatchNorm always normalises with the statistics of the current batch,
in training AND in evaluation: a generator is only ever used to make a batch,
and its images should look the same whether or not it is being trained. Flax
updates the (unused) running averages whenever it uses batch statistics, so
`apply` needs `mutable=['batch_stats']`; `sample(...)` does that and drops
the update. `save_samples` writes a batch of generated images as a PNG grid.

The 32 px generator's inner BatchNorms use epsilon 0.8: the original code
passes 0.8 positionally where PyTorch expects `eps` (the author meant
momentum). It is reproduced (`DCGAN_BN_EPS_QUIRK`) and configurable.

Convolutions and the dense layer go through `layers.*`; transposed convs use
`nn.ConvTranspose` directly because `layers` has no transposed-conv helper
(the generator is never quantised, so nothing is lost). Its explicit
((2, 2), (2, 2)) padding reproduces PyTorch's ConvTranspose2d(4, 2,
padding=1): output size exactly 2x the input.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from edgevl_jax.models import layers
from edgevl_jax.utils import io

# Epsilon of the 32 px generator's inner BatchNorms in the original code.
DCGAN_BN_EPS_QUIRK = 0.8
# PyTorch's default BatchNorm epsilon, used everywhere else.
BN_EPS = 1e-5
# Latent size used in the paper.
NZ = 256


def _upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of an NHWC tensor (nn.Upsample(2))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Generator32(nn.Module):
  """DCGAN generator for 32 x 32 images.

  Attributes:
    nz: latent size.
    img_channels: output channels.
    ngf: channels of the 8 x 8 start (128 in the paper); the last block has
      ngf // 2.
    bn_eps_quirk: epsilon of the two inner BatchNorms (0.8 in the original).
    ops: injected matmul/conv implementations.
  """

  nz: int = NZ
  img_channels: int = 3
  ngf: int = 128
  bn_eps_quirk: float = DCGAN_BN_EPS_QUIRK
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps (B, nz) latents to (B, 32, 32, img_channels) images."""
    _check_latent(z, self.nz)
    bn = lambda eps, **kw: layers.BatchNorm(epsilon=eps, **kw)
    x = layers.dense(self.ngf * 8 * 8, ops=self.ops,
                     axes=(layers.EMBED, layers.CONV_OUT), name="l1")(z)
    x = x.reshape(z.shape[0], 8, 8, self.ngf)
    x = bn(BN_EPS, name="bn0")(x, use_running_average=False)
    x = _upsample2x(x)
    x = layers.conv(self.ngf, (3, 3), ops=self.ops, name="conv1")(x)
    x = bn(self.bn_eps_quirk, name="bn1")(x, use_running_average=False)
    x = nn.leaky_relu(x, 0.2)
    x = _upsample2x(x)
    x = layers.conv(self.ngf // 2, (3, 3), ops=self.ops, name="conv2")(x)
    x = bn(self.bn_eps_quirk, name="bn2")(x, use_running_average=False)
    x = nn.leaky_relu(x, 0.2)
    x = layers.conv(self.img_channels, (3, 3), ops=self.ops, name="conv3")(x)
    x = jnp.tanh(x)
    return bn(BN_EPS, use_scale=False, use_bias=False, name="bn_out")(
        x, use_running_average=False)


class DeconvGenerator(nn.Module):
  """Transposed-conv generator for 128 and 224 px images.

  Attributes:
    start_size: spatial size after the dense layer (8 -> 128 px, 14 -> 224 px).
    channels: start channels then the output of each of the four
      transposed-conv blocks (each doubles the resolution).
    final_bn: append BN(3) without affine parameters after tanh (224 px).
    nz, img_channels, ops: as in `Generator32`.
  """

  start_size: int = 8
  channels: Sequence[int] = (512, 256, 128, 64, 64)
  final_bn: bool = False
  nz: int = NZ
  img_channels: int = 3
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps (B, nz) latents to (B, 16*start_size, 16*start_size, C) images."""
    _check_latent(z, self.nz)
    c0, s = self.channels[0], self.start_size
    x = layers.dense(c0 * s * s, ops=self.ops,
                     axes=(layers.EMBED, layers.CONV_OUT), name="l1")(z)
    x = x.reshape(z.shape[0], s, s, c0)
    x = layers.BatchNorm(name="bn0")(x, use_running_average=False)
    for i, c in enumerate(self.channels[1:]):
      x = nn.ConvTranspose(
          c, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=False,
          param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(),
              (None, None, layers.CONV_IN, layers.CONV_OUT)),
          name=f"deconv{i + 1}")(x)
      x = layers.BatchNorm(name=f"bn{i + 1}")(x, use_running_average=False)
      x = nn.leaky_relu(x, 0.2)
    x = layers.conv(self.img_channels, (3, 3), ops=self.ops, name="conv_out")(x)
    x = jnp.tanh(x)
    if self.final_bn:
      x = layers.BatchNorm(use_scale=False, use_bias=False, name="bn_out")(
          x, use_running_average=False)
    return x


def _check_latent(z: jax.Array, nz: int) -> None:
  if z.ndim != 2 or z.shape[1] != nz:
    raise ValueError(
        f"generator latent z must have shape (batch, nz={nz}); found "
        f"{tuple(z.shape)}. Sample z with jax.random.normal(key, (B, {nz})).")


def build(image_size: int, **overrides: Any) -> nn.Module:
  """The paper's generator for `image_size` in {32, 128, 224}."""
  if image_size == 32:
    return Generator32(**overrides)
  if image_size == 128:
    return DeconvGenerator(start_size=8, final_bn=False, **overrides)
  if image_size == 224:
    return DeconvGenerator(start_size=14, final_bn=True, **overrides)
  raise ValueError(
      f"generator image_size must be one of 32, 128, 224; found {image_size}. "
      "Set config.generator.image_size accordingly.")


def sample(model: nn.Module, variables: Any, z: jax.Array) -> jax.Array:
  """Generates images with batch statistics, discarding running-stat updates.

  Args:
    model: a generator from `build`.
    variables: {'params': ..., 'batch_stats': ...}.
    z: (B, nz) latents.

  Returns:
    (B, H, W, C) float32 images.
  """
  images, _ = model.apply(variables, z, mutable=["batch_stats"])
  return images


def save_samples(path: str, images: np.ndarray, columns: int = 8) -> None:
  """Writes a grid PNG; each image min-max scaled (generator output is BN'd)."""
  lo = images.min(axis=(1, 2, 3), keepdims=True)
  hi = images.max(axis=(1, 2, 3), keepdims=True)
  images = ((images - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * (h + 2), columns * (w + 2), c), np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h,
         col * (w + 2) + 1:col * (w + 2) + 1 + w] = im
  scale = max(1, 256 // grid.shape[1])
  image = Image.fromarray(grid).resize(
      (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  with io.atomic_path(path) as tmp:  # keeps the suffix: PIL's format
    image.save(tmp)
