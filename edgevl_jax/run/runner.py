"""The runner: what every job gets the same way.

A training job describes itself with a `TrainSpec` (how to initialise the
student, its step, its batches, its evaluators, its report); `train` does the
rest identically for every job: mesh, sharded TrainState, the step jitted
with explicit shardings and donation, orbax checkpoints (resume, fallback,
time and step cadence), metrics.jsonl + TensorBoard + progress bar, NaN
guard, preemption, evaluation cadence, model selection (KeepBest) and
loss.png. `execute` runs any job module (training or one-shot) and returns
its report. Nothing here imports a job or a model family.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections

from edgevl_jax.models import layers
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import evaluators as evaluators_lib
from edgevl_jax.run import loop
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import plots
from edgevl_jax.run import state as state_lib

Step = Callable[..., tuple[Any, Mapping[str, jax.Array]]]


@dataclasses.dataclass
class TrainSpec:
  """What a training job supplies.

  Attributes:
    step: (state, *aux, batch) -> (state, metrics dict of scalars); jitted
      by the runner with the state donated (unless `jitted`). Without
      batches: (state, *aux) -> (state, metrics).
    batches: iterator of host batches (dicts of numpy arrays); its
      get_state/set_state, if any, is checkpointed. None for a job that
      makes its own data inside the step (data-free distillation).
    num_steps: total updates.
    init: key -> initial variables {'params': ..., other collections}; the
      runner builds the optimiser from config.optim and num_steps. Not
      needed when `state` is given.
    state: (state, shardings) built by the job itself (e.g. two networks
      trained in one step); then `init` is unused.
    aux: extra arguments of `step` placed before the batch (e.g. a frozen
      teacher's params), with `aux_shardings`.
    prepare: host batch -> device batch (default: shard every array of the
      batch over the mesh's batch axes).
    rules: logical axis rules for the state (default: layers' rules).
    evaluators: objects with run(state) -> {name: number}.
    keep_best: KeepBest(metric, save) callback after each evaluation.
    steps_per_epoch: evaluation cadence when config.eval_every is 0.
    on_state: called with the live state (see loop.fit).
    report: (state, summary) -> the job's report dict.
    seed: the state's seed (default config.seed), e.g. one per model when
      a job trains several.
    jitted: `step` is already compiled with its shardings (a job whose
      iteration is several jitted calls); the runner calls it as is.
    title: loss.png title.
    guard_keys: metrics that must stay finite (default: losses, grad norms).
  """
  step: Step
  batches: Iterator[Any] | None
  num_steps: int
  init: Callable[[jax.Array], Mapping[str, Any]] | None = None
  state: tuple[Any, Any] | None = None
  aux: tuple[Any, ...] = ()
  aux_shardings: tuple[Any, ...] = ()
  prepare: Callable[[Any], Any] | None = None
  rules: Sequence[tuple[str, Any]] = layers.LOGICAL_AXIS_RULES
  evaluators: Sequence[evaluators_lib.Evaluator] = ()
  keep_best: evaluators_lib.KeepBest | None = None
  steps_per_epoch: int | None = None
  on_state: Callable[[Any], None] | None = None
  report: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
  seed: int | None = None
  jitted: bool = False
  title: str = ''
  guard_keys: Sequence[str] | None = None


@dataclasses.dataclass
class Context:
  """What a job receives besides its config.

  Attributes:
    workdir: the job's folder.
    config: the job's complete, locked config.
    cache: objects shared by the stages of one pipeline in this process
      (e.g. a loaded, compiled teacher), keyed by what they depend on.
  """
  workdir: str
  config: ml_collections.ConfigDict
  cache: dict[Any, Any] = dataclasses.field(default_factory=dict)
  _mesh: jax.sharding.Mesh | None = None

  @property
  def mesh(self) -> jax.sharding.Mesh:
    if self._mesh is None:
      self._mesh = mesh_lib.make_mesh(self.config.mesh)
    return self._mesh

  def child(self, workdir: str, config: ml_collections.ConfigDict
            ) -> 'Context':
    """A context for a sub-run (a pipeline stage, one of several models)."""
    return Context(workdir=workdir, config=config, cache=self.cache)

  def train(self, spec: TrainSpec, workdir: str | None = None
            ) -> tuple[Any, dict[str, Any]]:
    """`train(spec)` in this context (or in a sub-folder `workdir`)."""
    return train(spec, self if workdir is None else self.child(
        workdir, self.config))


def _eval_every(config: Any, spec: TrainSpec) -> int | None:
  if config.eval_every:
    return int(config.eval_every)
  return spec.steps_per_epoch or None


def _jitted_step(spec: TrainSpec, state_sh: Any, mesh: jax.sharding.Mesh,
                 cache: dict[Any, Any]) -> Callable[..., Any]:
  """The step jitted with shardings and donation; one compile per step
  function and layout (a job training several models reuses it)."""
  in_sh = (state_sh, *spec.aux_shardings)
  if spec.batches is not None:
    in_sh += (mesh_lib.batch_sharding(mesh),)
  leaves, tree = jax.tree.flatten(in_sh)
  key = ("jitted_step", spec.step, tree, tuple(leaves))
  if key not in cache:
    cache[key] = mesh_lib.jit_sharded(
        spec.step, in_shardings=in_sh,
        out_shardings=(state_sh, mesh_lib.replicated(mesh)),
        donate_argnums=0)
  return cache[key]


def train(spec: TrainSpec, ctx: Context) -> tuple[Any, dict[str, Any]]:
  """Trains `spec` in ctx.workdir; returns (final state, summary).

  Writes (the same for every job): checkpoints/, metrics.jsonl, tb/ (with
  config.tensorboard), loss.png, best.json (with keep_best).
  """
  config, mesh = ctx.config, ctx.mesh
  os.makedirs(ctx.workdir, exist_ok=True)
  if spec.state is not None:
    state, state_sh = spec.state
  else:
    if spec.init is None:
      raise ValueError('TrainSpec needs init or state.')
    tx = optim_lib.make_optimizer(config.optim, spec.num_steps)
    seed = config.seed if spec.seed is None else spec.seed
    state, state_sh = state_lib.create_train_state(
        spec.init, tx, jax.random.key(seed), mesh=mesh, rules=spec.rules)
  step_fn = (spec.step if spec.jitted
             else _jitted_step(spec, state_sh, mesh, ctx.cache))
  aux = spec.aux
  if spec.batches is None:
    train_step, prepare = (lambda s, _: step_fn(s, *aux)), None
  else:
    train_step = lambda s, b: step_fn(s, *aux, b)
    prepare = spec.prepare or (lambda b: mesh_lib.shard_batch(b, mesh))
  eval_fn = None
  if spec.evaluators:
    callbacks = [spec.keep_best] if spec.keep_best is not None else []
    eval_fn = lambda s: evaluators_lib.run_all(spec.evaluators, s, callbacks)
  with checkpoint_lib.Checkpointer(
      os.path.join(ctx.workdir, 'checkpoints'),
      max_to_keep=config.max_to_keep) as ckpt, metrics_lib.MetricWriter(
          ctx.workdir, total_steps=spec.num_steps,
          tensorboard=config.tensorboard,
          progress=config.progress) as writer:
    state, summary = loop.fit(
        state, train_step, spec.batches,
        num_steps=spec.num_steps, checkpointer=ckpt, writer=writer,
        log_every=config.log_every, ckpt_every=config.ckpt_every,
        ckpt_every_minutes=config.ckpt_every_minutes, eval_fn=eval_fn,
        eval_every=_eval_every(config, spec), prepare_batch=prepare,
        guard_keys=spec.guard_keys, on_state=spec.on_state)
  if metrics_lib.is_main_process():
    plots.plot_curves(os.path.join(ctx.workdir, metrics_lib.METRICS_FILE),
                      os.path.join(ctx.workdir, 'loss.png'),
                      title=spec.title or None)
  return state, summary


def execute(module: types.ModuleType, ctx: Context) -> dict[str, Any]:
  """Runs a validated job module in its context; returns its report."""
  if hasattr(module, 'build'):
    spec = module.build(ctx.config, ctx)
    state, summary = train(spec, ctx)
    report = (spec.report(state, summary) if spec.report is not None
              else {k: v for k, v in summary.items()
                    if isinstance(v, (int, float))})
  else:
    report = module.run(ctx.config, ctx)
  return metrics_lib.jsonable(dict(report))
