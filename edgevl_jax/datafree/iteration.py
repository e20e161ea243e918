"""One CDFKD-MFS iteration: `student_steps` student updates, then one
generator update, on a state holding both networks (DataFreeState).

The student minimises L_S (losses.datafree_student_loss) on fresh generator
images; the generator minimises L_G = -disagreement + w_bn * BN-statistics
loss (losses.datafree_generator_loss). Latents and generated batches are
split over the mesh's data axes. Keys: fold_in(rng, step), then the index of
the update within the iteration, so a resumed run draws the same images.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from edgevl_jax import classification as cls
from edgevl_jax import losses
from edgevl_jax.datafree import teachers as teachers_lib
from edgevl_jax.models import generator as generator_lib
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import state as state_lib

# Latents use 'rbg' bits (see classification.init_key: faster XLA:CPU
# compiles).
PRNG_IMPL = "rbg"
init_key = cls.init_key


class DataFreeState(struct.PyTreeNode):
  """Everything a resumed run needs.

  Attributes:
    step: int32, iterations done (5 student + 1 generator update each).
    student: TrainState of the multi-header student (batch_stats in
      model_state).
    generator: TrainState of the generator.
    rng: base key; iteration keys are fold_in(rng, step).
  """
  step: jax.Array
  student: state_lib.TrainState
  generator: state_lib.TrainState
  rng: jax.Array


def _epoch_milestones(optim: Any, steps_per_epoch: int) -> Any:
  """A copy of `optim` whose epoch milestones are optimiser-step numbers."""
  out = ml_collections.ConfigDict(config_lib.to_dict(optim))
  if out.get("milestones"):
    out.milestones = [int(m) * steps_per_epoch for m in optim.milestones]
  return out


class Steps(NamedTuple):
  """The pieces of one iteration (each traceable under `jax.jit`).

  student_step(s, g_vars, teachers, key) -> (s, metrics): one student update
    on a fresh batch; the generator only produces images (no gradient).
  generator_step(g, s_vars, teachers, key) -> (g, metrics): one generator
    update; the student's variables are only read.
  student_update(state, teachers, i) -> (state, metrics): student step `i`
    of the current iteration, on the whole DataFreeState.
  generator_update(state, teachers) -> (state, metrics): the iteration's
    generator step; increments `state.step`.
  summarize(student_metrics, generator_metrics) -> metrics: the iteration's
    metrics from the stacked (leading axis = step) student metrics.
  iteration(state, teachers) -> (state, metrics): `student_steps` student
    updates (a scan) then one generator update, as one function.
  """
  student_step: Callable[..., Any]
  generator_step: Callable[..., Any]
  student_update: Callable[..., Any]
  generator_update: Callable[..., Any]
  summarize: Callable[..., Any]
  iteration: Callable[..., Any]


def make_steps(config: Any, student: nn.Module, gen: nn.Module,
               teacher: nn.Module, mesh: jax.sharding.Mesh) -> Steps:
  """Builds the student step, the generator step and the iteration."""
  lc = config.loss
  batch, nz = config.batch_size, gen.nz
  z_sharding = mesh_lib.batch_sharding(mesh)

  def latent(key):
    z = jax.random.normal(key, (batch, nz), jnp.float32)
    return jax.lax.with_sharding_constraint(z, z_sharding)

  def student_step(s, gen_vars, teachers, key):
    images = jax.lax.stop_gradient(
        generator_lib.sample(gen, gen_vars, latent(key)))
    t_logits, t_pooled, _ = teachers_lib.teachers_forward(teacher, teachers, images)

    def loss_fn(params):
      out, mutated = student.apply({"params": params, **s.model_state},
                                   images, train=True, mutable=["batch_stats"])
      loss, terms = losses.datafree_student_loss(
          student_logits=out["head_logits"], teacher_logits=t_logits,
          student_features=out["head_features"], teacher_features=t_pooled,
          w_feat=lc.w_feat, w_ens=lc.w_ens)
      agree = jnp.mean(jnp.argmax(out["logits"], -1)
                       == jnp.argmax(jnp.mean(t_logits, 0), -1))
      return loss, (mutated, terms, agree)

    (loss, (mutated, terms, agree)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(s.params)
    s = s.apply_gradients(grads, model_state=dict(mutated))
    return s, {"student_loss": loss, "agreement": agree,
               **{f"student/{k}": v for k, v in terms.items()}}

  def generator_step(g, student_vars, teachers, key):
    z = latent(key)

    def loss_fn(params):
      images, g_mut = gen.apply({"params": params, **g.model_state}, z,
                                mutable=["batch_stats"])
      t_logits, _, bn = teachers_lib.teachers_forward(
          teacher, teachers, images, bn_first_weight=lc.bn_first_weight)
      # Student in training mode, as in the student steps; its running
      # statistics are not updated by the generator step.
      out, _ = student.apply(student_vars, images, train=True,
                             mutable=["batch_stats"])
      loss, terms = losses.datafree_generator_loss(
          student_logits=out["head_logits"], teacher_logits=t_logits,
          bn_losses=bn, w_bn=lc.w_bn)
      return loss, (g_mut, terms)

    (loss, (g_mut, terms)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(g.params)
    g = g.apply_gradients(grads, model_state=dict(g_mut))
    return g, {"generator_loss": loss,
               **{f"generator/{k}": v for k, v in terms.items()}}

  def iteration_key(state: DataFreeState) -> jax.Array:
    return jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=PRNG_IMPL), state.step)

  def student_update(state: DataFreeState, teachers: Any, i: jax.Array):
    s, metrics = student_step(state.student, state.generator.variables,
                              teachers,
                              jax.random.fold_in(iteration_key(state), i))
    return state.replace(student=s), metrics

  def generator_update(state: DataFreeState, teachers: Any):
    g, metrics = generator_step(
        state.generator, state.student.variables, teachers,
        jax.random.fold_in(iteration_key(state), config.student_steps))
    return state.replace(step=state.step + 1, generator=g), metrics

  def summarize(s_metrics: Any, g_metrics: Any) -> dict[str, jax.Array]:
    metrics = {k: jnp.mean(v) for k, v in s_metrics.items()}
    metrics["agreement_last"] = s_metrics["agreement"][-1]
    metrics.update(g_metrics)
    return metrics

  def iteration(state: DataFreeState, teachers: Any):
    state, s_metrics = jax.lax.scan(
        lambda st, i: student_update(st, teachers, i), state,
        jnp.arange(config.student_steps))
    state, g_metrics = generator_update(state, teachers)
    return state, summarize(s_metrics, g_metrics)

  return Steps(student_step, generator_step, student_update, generator_update,
               summarize, iteration)


def compile_iteration(config: Any, steps: Steps, state_sh: Any,
                      mesh: jax.sharding.Mesh
                      ) -> Callable[[DataFreeState, Any], Any]:
  """One iteration, jitted with the state's shardings (state donated).

  `config.fused_iteration` (default: True except on CPU) jits
  `steps.iteration` whole. Otherwise the iteration is `student_steps` calls
  of one jitted student update plus one jitted generator update: XLA:CPU
  runs the scan over student steps ~5x slower than separate calls (14 s vs
  3 s per batch-64 iteration at the default digits sizes), and unrolling the
  scan doubles the compile time. Both give the same updates and keys.
  """
  rep = mesh_lib.replicated(mesh)
  fused = config.fused_iteration
  if fused is None:
    fused = jax.default_backend() != "cpu"
  if fused:
    return mesh_lib.jit_sharded(
        steps.iteration, in_shardings=(state_sh, rep),
        out_shardings=(state_sh, rep), donate_argnums=0)
  student_update = mesh_lib.jit_sharded(
      steps.student_update, in_shardings=(state_sh, rep, rep),
      out_shardings=(state_sh, rep), donate_argnums=0)
  generator_update = mesh_lib.jit_sharded(
      steps.generator_update, in_shardings=(state_sh, rep),
      out_shardings=(state_sh, rep), donate_argnums=0)
  summarize = jax.jit(
      lambda s, g: steps.summarize(jax.tree.map(lambda *v: jnp.stack(v), *s),
                                   g))

  def iteration(state: DataFreeState, teachers: Any):
    s_metrics = []
    for i in range(config.student_steps):
      state, metrics = student_update(state, teachers, np.int32(i))
      s_metrics.append(metrics)
    state, g_metrics = generator_update(state, teachers)
    return state, summarize(s_metrics, g_metrics)

  return iteration


def create_state(config: Any, student: nn.Module, gen: nn.Module,
                 mesh: jax.sharding.Mesh) -> tuple[DataFreeState, Any]:
  """Fresh sharded state and its shardings."""
  total = config.epochs * config.iters_per_epoch
  s_tx = optim_lib.make_optimizer(
      _epoch_milestones(config.student_optim,
                        config.iters_per_epoch * config.student_steps),
      total * config.student_steps)
  g_tx = optim_lib.make_optimizer(
      _epoch_milestones(config.generator_optim, config.iters_per_epoch), total)
  s_key, g_key = jax.random.split(jax.random.PRNGKey(config.seed))
  base = jax.random.key_data(jax.random.key(config.seed, impl=PRNG_IMPL))
  size = config.generator.image_size
  images = jnp.zeros((2, size, size, 3), jnp.float32)
  keep = ["params", "batch_stats"]
  s_state, s_sh = state_lib.create_train_state(
      lambda k: student.init(init_key(k), images, mutable=keep), s_tx, s_key,
      mesh=mesh)
  z = jnp.zeros((2, gen.nz), jnp.float32)
  g_state, g_sh = state_lib.create_train_state(
      lambda k: gen.init(init_key(k), z, mutable=keep), g_tx, g_key,
      mesh=mesh)
  rep = mesh_lib.replicated(mesh)
  state = DataFreeState(step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                        student=s_state, generator=g_state,
                        rng=jax.device_put(base, rep))
  return state, DataFreeState(step=rep, student=s_sh, generator=g_sh, rng=rep)
