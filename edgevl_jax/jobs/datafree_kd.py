"""Trainer 'datafree_kd': collaborative data-free distillation (CDFKD-MFS).

H frozen teachers (trained by the 'classifier' trainer) are distilled into
one multi-header student (models/multihead.py) using only images from a
generator trained adversarially against the student. One iteration =
`student_steps` (5) student updates, each on a fresh z, then one generator
update:
  student:   minimise L_S (losses.datafree_student_loss), SGD + step decay;
  generator: minimise L_G = -disagreement + w_bn * BN-statistics loss
             (losses.datafree_generator_loss), Adam + step decay.
Teachers run in inference mode (running statistics) and sow the moments of
every BatchNorm input (`layers.BatchNorm`) for the BN-statistics loss. The
iteration is jitted with explicit shardings (z and the generated batch are
split over the mesh's data axes): as one function on accelerators, as one
jitted student update called `student_steps` times plus a jitted generator
update on CPU (see `compile_iteration`).

No real training image is used, except (optionally) `attention.fraction` of
the training set at the end to fit the attention aggregation with the
student frozen. The test split is used for evaluation only.

Workdir: metrics.jsonl, checkpoints/ (student + generator + both optimiser
states + rng, as one pytree), samples.png (generated images), report.json
with accuracy.{teacher_ensemble, teacher_each, student_mean_heads,
student_each_head, student_attention}.
"""
from __future__ import annotations

import functools
import glob
import itertools
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from edgevl_jax import losses
from edgevl_jax.models import generator as generator_lib
from edgevl_jax.models import layers
from edgevl_jax.models import multihead
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import classifier
from edgevl_jax.train import config_utils
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import state as state_lib

SAMPLES_FILE = "samples.png"
# Latents use 'rbg' bits (see classifier.init_key: faster XLA:CPU compiles).
PRNG_IMPL = "rbg"
init_key = classifier.init_key


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


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("teachers_dir", "dataset", "data_dir", "student.trunk"):
    config_utils.require(config, key)
  for key in ("batch_size", "epochs", "iters_per_epoch", "student_steps"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require(config, "generator.image_size", allowed=(32, 128, 224))
  for name in ("student_optim", "generator_optim"):
    state_lib.validate_optim_config(config[name], prefix=name)
    for m in list(config[name].get("milestones") or ()):
      if not 0 < m < config.epochs:
        raise ValueError(f"config.{name}.milestones are epochs in (0, "
                         f"{config.epochs}); found {m}.")


def _epoch_milestones(optim: Any, steps_per_epoch: int) -> Any:
  """A copy of `optim` whose epoch milestones are optimiser-step numbers."""
  out = ml_collections.ConfigDict(config_utils.to_dict(optim))
  if out.get("milestones"):
    out.milestones = [int(m) * steps_per_epoch for m in optim.milestones]
  return out


def load_teachers(teachers_dir: str) -> tuple[nn.Module, Any, list[str]]:
  """The classifier stage's models: (model, stacked variables (H, ...), dirs).

  Teachers must share one architecture (the paper's three ResNet-34s), so
  their variables are stacked (leading axis H).
  """
  dirs = sorted(glob.glob(os.path.join(teachers_dir, "model_*")))
  if not dirs:
    raise ValueError(f"No teacher folders model_* in {teachers_dir!r}; point "
                     "config.teachers_dir at a finished 'classifier' workdir.")
  loaded = [classifier.load_classifier(d) for d in dirs]
  shapes = [jax.tree.map(np.shape, v) for _, v in loaded]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError(f"Teachers in {teachers_dir!r} have different "
                     "architectures; train them with one model config.")
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *[v for _, v in loaded])
  return loaded[0][0], stacked, dirs


def teachers_forward(model: nn.Module, stacked: Any, images: jax.Array, *,
                     bn_first_weight: float | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """All teachers in inference mode: logits (H, B, K), pooled (H, B, C).

  With `bn_first_weight`, also each teacher's BN-statistics loss (H,), from
  the input moments sown by every `layers.BatchNorm` (computed in the same
  trace as the apply, which keeps the sown layers in execution order).
  """
  def one(variables):
    if bn_first_weight is None:
      logits, pooled = classifier.logits_and_features(model, variables, images)
      return logits, pooled, jnp.zeros(())
    (logits, pooled), mutated = classifier.logits_and_features(
        model, variables, images, mutable=[layers.BN_STATS])
    batch, running = losses.teacher_bn_moments(
        mutated[layers.BN_STATS], variables["batch_stats"])
    bn = losses.bn_statistics_loss(batch_moments=batch,
                                   running_moments=running,
                                   first_layer_weight=bn_first_weight)
    return logits, pooled, bn
  # An unrolled loop, not jax.vmap: vmapping a conv over both weights and
  # activations lowers to a grouped conv, which XLA:CPU runs ~5-10x slower
  # than H plain convs (lax.map is as fast forward but ~10x slower to
  # differentiate, which the generator step does).
  n = jax.tree.leaves(stacked)[0].shape[0]
  outs = [one(jax.tree.map(lambda v: v[i], stacked)) for i in range(n)]
  return tuple(jnp.stack(o) for o in zip(*outs))


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
    t_logits, t_pooled, _ = teachers_forward(teacher, teachers, images)

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
      t_logits, _, bn = teachers_forward(
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
  fused = config_utils.get(config, "fused_iteration", None)
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
  s_tx = state_lib.make_optimizer(
      _epoch_milestones(config.student_optim,
                        config.iters_per_epoch * config.student_steps),
      total * config.student_steps)
  g_tx = state_lib.make_optimizer(
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


def _attention(config: Any, head_logits_train: np.ndarray,
               labels: np.ndarray, head_logits_test: np.ndarray,
               test_labels: np.ndarray) -> tuple[float, int]:
  """Fits the attention aggregation on a few real samples; test accuracy."""
  fraction = float(config_utils.get(config, "attention.fraction", 0.01))
  n = len(labels)
  picked = np.random.default_rng(config.seed).permutation(n)[
      :max(1, int(round(fraction * n)))]
  x, y = jnp.asarray(head_logits_train[:, picked]), jnp.asarray(labels[picked])
  agg = multihead.AttentionAggregator()
  params = nn.unbox(agg.init(jax.random.key(config.seed), x))["params"]
  tx = optax.adam(float(config_utils.get(config, "attention.lr", 1e-2)))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      logits, _ = agg.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for _ in range(int(config_utils.get(config, "attention.steps", 200))):
    params, opt = step(params, opt)
  logits, _ = agg.apply({"params": params}, jnp.asarray(head_logits_test))
  return classifier.accuracy(np.asarray(logits), test_labels), len(picked)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs data-free distillation, then evaluates on the real test split."""
  validate_config(config)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  teacher, teacher_vars, teacher_dirs = load_teachers(config.teachers_dir)
  num_heads = len(teacher_dirs)
  num_classes = int(jax.tree.leaves(
      teacher_vars["params"]["head"])[0].shape[-1])
  student = multihead.build(
      config.student.trunk, num_heads=num_heads, num_classes=num_classes,
      **dict(config_utils.get(config, "student.overrides", None) or {}))
  gen = generator_lib.build(
      config.generator.image_size,
      **dict(config_utils.get(config, "generator.overrides", None) or {}))
  state, state_sh = create_state(config, student, gen, mesh)
  rep = mesh_lib.replicated(mesh)
  teacher_vars = jax.device_put(teacher_vars, rep)
  step = compile_iteration(
      config, make_steps(config, student, gen, teacher, mesh), state_sh, mesh)
  total = config.epochs * config.iters_per_epoch

  test_images, test_labels = classifier.load_dataset(
      config.dataset, "test", data_dir=config.data_dir)
  t_apply = jax.jit(lambda v, x: teachers_forward(teacher, v, x)[0])
  t_logits = classifier.evaluate(functools.partial(t_apply, teacher_vars),
                                 test_images, test_labels)
  s_apply = jax.jit(lambda v, x: student.apply(v, x)["head_logits"])

  def s_predict_fn(variables):
    return functools.partial(s_apply, variables)

  def eval_fn(st: DataFreeState) -> dict[str, float]:
    logits = classifier.evaluate(s_predict_fn(st.student.variables),
                                 test_images, test_labels)
    return {"student_accuracy": classifier.accuracy(logits.mean(0),
                                                    test_labels),
            "test_agreement": float(np.mean(
                logits.mean(0).argmax(-1) == t_logits.mean(0).argmax(-1)))}

  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(workdir, total_steps=total,
                               tensorboard=False) as writer:
    state, summary = loop.fit(
        state, lambda st, _: step(st, teacher_vars), itertools.repeat(None),
        num_steps=total, checkpointer=ckpt, writer=writer,
        log_every=int(config_utils.get(config, "log_every", 50)),
        ckpt_every=config_utils.get(config, "ckpt_every", None),
        eval_fn=eval_fn, eval_every=config_utils.get(config, "eval_every",
                                                     None))

  s_logits = classifier.evaluate(s_predict_fn(state.student.variables),
                                 test_images, test_labels)
  z = jax.random.normal(jax.random.key(config.seed + 1), (64, gen.nz))
  generator_lib.save_samples(os.path.join(workdir, SAMPLES_FILE), np.asarray(
      generator_lib.sample(gen, state.generator.variables, z)))
  acc = {
      "teacher_each": [classifier.accuracy(l, test_labels) for l in t_logits],
      "teacher_ensemble": classifier.accuracy(t_logits.mean(0), test_labels),
      "student_mean_heads": classifier.accuracy(s_logits.mean(0), test_labels),
      "student_each_head": [classifier.accuracy(l, test_labels)
                            for l in s_logits],
  }
  report = {"accuracy": acc, "iterations": int(state.step),
            "samples_path": SAMPLES_FILE,
            "train": {k: v for k, v in summary.items()
                      if isinstance(v, (int, float))}}
  report["student_over_teacher_ensemble"] = (
      acc["student_mean_heads"] / max(acc["teacher_ensemble"], 1e-9))
  if config_utils.get(config, "attention.enabled", True):
    train_images, train_labels = classifier.load_dataset(
        config.dataset, "train", data_dir=config.data_dir)
    train_logits = classifier.evaluate(s_predict_fn(state.student.variables),
                                       train_images, train_labels)
    acc["student_attention"], used = _attention(
        config, train_logits, train_labels, s_logits, test_labels)
    report["attention_real_samples"] = used
  return report
