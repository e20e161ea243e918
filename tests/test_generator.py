"""Generators of data-free distillation: shapes, batch statistics, eps quirk."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax.models import generator


# Narrow channels keep the run cheap; the shape logic is the paper's.
_NARROW = {32: {"ngf": 16}, 128: {"channels": (16, 16, 8, 8, 8)},
           224: {"channels": (16, 16, 8, 8, 8)}}


@pytest.mark.parametrize("size", [32, 128, 224])
def test_paper_sized_generators_have_expected_shapes(size):
  g = generator.build(size)
  z = jax.ShapeDtypeStruct((64, generator.NZ), jnp.float32)
  variables = nn.unbox(jax.eval_shape(g.init, jax.random.key(0), z))
  out = jax.eval_shape(lambda v, z: generator.sample(g, v, z), variables, z)
  assert out.shape == (64, size, size, 3)
  first = variables["params"]["l1"]["kernel"]
  start = {32: 8 * 8 * 128, 128: 8 * 8 * 512, 224: 14 * 14 * 512}[size]
  assert first.shape == (generator.NZ, start)


@pytest.mark.parametrize("size", [32, 128, 224])
def test_output_shape_and_range(size):
  g = generator.build(size, **_NARROW[size])
  z = jax.random.normal(jax.random.key(0), (2, generator.NZ))
  variables = g.init(jax.random.key(1), z)
  images = generator.sample(g, variables, z)
  assert images.shape == (2, size, size, 3)
  assert images.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(images)))
  if size == 128:  # tanh is the last op at 128 px
    assert float(jnp.max(jnp.abs(images))) <= 1.0


@pytest.mark.parametrize("size", [32, 224])
def test_final_affine_free_bn_normalises_each_batch(size):
  g = generator.build(size, **_NARROW[size])
  z = 3.0 * jax.random.normal(jax.random.key(2), (4, generator.NZ))
  images = generator.sample(g, g.init(jax.random.key(3), z), z)
  mean = jnp.mean(images, axis=(0, 1, 2))
  var = jnp.var(images, axis=(0, 1, 2))
  np.testing.assert_allclose(mean, 0.0, atol=1e-4)
  # The final BN has epsilon 1e-5 and a pre-BN variance below 1 (tanh).
  assert bool(jnp.all((var > 0.9) & (var < 1.0 + 1e-4)))


def test_running_statistics_are_never_used():
  g = generator.build(32, ngf=16)
  z = jax.random.normal(jax.random.key(4), (8, generator.NZ))
  variables = g.init(jax.random.key(5), z)
  garbage = jax.tree.map(lambda a: a * 0.0 + 123.0, variables["batch_stats"])
  a = generator.sample(g, variables, z)
  b = generator.sample(
      g, {"params": variables["params"], "batch_stats": garbage}, z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The training-mode update of the running stats is returned, not needed.
  _, updates = g.apply(variables, z, mutable=["batch_stats"])
  assert not np.allclose(updates["batch_stats"]["bn1"]["bn"]["mean"], 0.0)


def test_bn_epsilon_quirk_is_reproduced_and_configurable():
  assert generator.DCGAN_BN_EPS_QUIRK == 0.8
  assert generator.Generator32().bn_eps_quirk == 0.8
  z = jax.random.normal(jax.random.key(6), (4, generator.NZ))
  quirk = generator.build(32, ngf=16)
  plain = generator.build(32, ngf=16, bn_eps_quirk=1e-5)
  variables = quirk.init(jax.random.key(7), z)
  a = generator.sample(quirk, variables, z)
  b = generator.sample(plain, variables, z)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_bad_latent_and_size_name_the_problem():
  g = generator.build(32)
  with pytest.raises(ValueError, match="nz=256"):
    g.init(jax.random.key(0), jnp.zeros((2, 100)))
  with pytest.raises(ValueError, match="image_size"):
    generator.build(64)
