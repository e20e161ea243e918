"""Stage-1 memory options: grad_accum, remat and bfloat16 keep the update."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from edgevl_jax.edgevl import handoff
from edgevl_jax.jobs import dual_modality_kd as kd
from edgevl_jax.models import students
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import registry
from edgevl_jax.run import state as state_lib
# The tiny CLIP teacher and the 8-device mesh of the trainer-step tests.
from tests.test_trainers_edgevl import mesh  # noqa: F401 (fixture)
from tests.test_trainers_edgevl import teacher  # noqa: F401 (fixture)

S = 16
TINY = {
    "vit_ti16": dict(image_size=S, patch_size=4, width=32, depth=2,
                     num_heads=2, drop_path_rate=0.0),
    "swin_t": dict(image_size=S, patch_size=2, window_size=2, width=16,
                   depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                   drop_path_rate=0.0),
}
# Plain SGD with lr 1: the update is the gradient itself.
SGD = ml_collections.ConfigDict(dict(name="sgd", lr=1.0, momentum=0.0,
                                     schedule="constant", weight_decay=0.0))


def _batch(mesh, n=32):
  k1, k2 = jax.random.split(jax.random.key(5))
  return mesh_lib.shard_batch(
      {"rgb": np.asarray(jax.random.uniform(k1, (n, S, S, 3))),
       "other": np.asarray(jax.random.uniform(k2, (n, S, S, 3)))}, mesh)


def _one_step(mesh, teacher, name, *, grad_accum=1, t_params=None,
              **train_overrides):
  t_model, tp = teacher
  model = students.build(name, embed_dim=16, **TINY[name])
  train_model = students.build(name, embed_dim=16,
                               **{**TINY[name], **train_overrides})
  tx = optim_lib.make_optimizer(SGD, 10)
  state, _ = state_lib.create_train_state(
      lambda k: model.init(k, jnp.zeros((1, S, S, 3))), tx,
      jax.random.key(1), mesh=mesh, rules=mesh_lib.REPLICATED_RULES)
  norm = handoff.normalizer("clip")
  step = jax.jit(kd.make_train_step(
      train_model, t_model, kind="l1", mode="both", t_norm=norm,
      s_norm=norm, grad_accum=grad_accum))
  before = state.params
  before = jax.tree.map(np.asarray, before)
  new, metrics = step(state, tp if t_params is None else t_params,
                      _batch(mesh))
  return before, jax.tree.map(np.asarray, new.params), float(metrics["loss"])


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(x - y).max()), a, b)))


def test_grad_accum_4_equals_the_full_batch_update(mesh, teacher):
  p0, full, loss_full = _one_step(mesh, teacher, "vit_ti16")
  _, accum, loss_accum = _one_step(mesh, teacher, "vit_ti16", grad_accum=4)
  update = _max_diff(full, p0)
  assert update > 1e-3  # the step moved the params
  assert _max_diff(full, accum) <= 1e-5 * update
  assert loss_accum == pytest.approx(loss_full, rel=1e-5)


@pytest.mark.parametrize("name", ["vit_ti16", "swin_t"])
def test_remat_gives_the_same_update(mesh, teacher, name):
  p0, plain, loss = _one_step(mesh, teacher, name)
  _, remat, loss_remat = _one_step(mesh, teacher, name, remat=True)
  assert _max_diff(plain, remat) <= 1e-6 * max(_max_diff(plain, p0), 1.0)
  assert loss_remat == pytest.approx(loss, rel=1e-6)


def test_bfloat16_compute_and_teacher_keep_float32_params(mesh, teacher):
  t_model, tp = teacher
  p0, fp32, loss32 = _one_step(mesh, teacher, "vit_ti16")
  bf16_teacher = (t_model.clone(dtype=jnp.bfloat16), tp)
  half_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tp)
  _, bf16, loss16 = _one_step(mesh, bf16_teacher, "vit_ti16",
                              t_params=half_params, dtype=jnp.bfloat16)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16))
  assert loss16 == pytest.approx(loss32, rel=2e-2)
  # The bf16 update points the same way as the fp32 one.
  d32 = np.concatenate([(a - b).ravel() for a, b in zip(
      jax.tree.leaves(fp32), jax.tree.leaves(p0))])
  d16 = np.concatenate([(a - b).ravel() for a, b in zip(
      jax.tree.leaves(bf16), jax.tree.leaves(p0))])
  cos = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16))
  assert cos > 0.98, cos


def test_memory_keys_are_validated_before_compute():
  config = registry.job_config("dual_modality_kd")
  config.batch_size, config.grad_accum = 32, 3
  with pytest.raises(ValueError, match="does not split into "
                     "config.grad_accum=3"):
    kd.validate(config)
  config.grad_accum, config.compute_dtype = 4, "float16"
  with pytest.raises(ValueError, match="config.compute_dtype must be one of"):
    kd.validate(config)
  config.compute_dtype = "bfloat16"
  config.student.name, config.remat = "resnet18", True
  with pytest.raises(ValueError, match="no rematerialisable blocks"):
    kd.validate(config)
