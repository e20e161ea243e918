"""A small, generic training loop: resume, log, guard, checkpoint.

    state, summary = loop.fit(state, train_step, batches, num_steps=1000,
                              checkpointer=ckpt, writer=writer,
                              log_every=50, ckpt_every=200)

`train_step(state, batch) -> (state, metrics)` is the job's jitted step
(see `mesh.jit_sharded`); it draws its randomness from `state.step_key()`,
so a resumed run is bit-identical to an uninterrupted one. `metrics` is a
dict of scalars kept on device: the loop fetches them only every
`log_every` steps and before each checkpoint (no per-step host sync).

Checkpoints come every `ckpt_every` steps, every `ckpt_every_minutes` of
wall time, at the end and on SIGTERM. None of them closes a log window: the
open window's per-step values travel in the checkpoint (with the summary
and the last evaluated step), so a run resumed from any checkpoint logs
exactly the lines an uninterrupted run logs.

Step numbers: `step` in metrics.jsonl and in checkpoint names is the number
of updates done, so the first update logs step 1.

NaN guard: before anything is logged or saved, every fetched metric whose
name contains 'loss' or 'grad_norm' (or `guard_keys`) must be finite. If not,
`NonFiniteError` names the first bad step and metric; the checkpoints on disk
are all from earlier, finite steps (nothing is written for the bad window).
"""
from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import metrics as metrics_lib

# Checkpoint extras written by `fit`.
SUMMARY, PENDING, LAST_EVAL = 'summary', 'pending_metrics', 'last_eval'


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN/Inf; the run stopped unsaved.

  Attributes:
    step: the update (1-based, as in metrics.jsonl) whose metric is bad.
    metric: the metric's name.
    last_checkpoint: step of the newest checkpoint on disk (None if none).
  """

  def __init__(self, step: int, metric: str, value: float,
               last_checkpoint: int | None, directory: str | None):
    self.step, self.metric, self.last_checkpoint = step, metric, last_checkpoint
    where = (f'the last good checkpoint is {directory}/{last_checkpoint}, '
             'from which a re-run resumes' if last_checkpoint is not None
             else 'no checkpoint was written yet')
    super().__init__(
        f'Non-finite {metric}={value} at step {step}; training stopped and '
        f'nothing was saved for this step ({where}). Fix: lower the learning '
        'rate, enable gradient clipping, or check the input data.')


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint of `step` was saved and training stopped."""

  def __init__(self, step: int, directory: str | None):
    self.step = step
    where = (f'checkpoint {directory}/{step} saved' if directory
             else 'no checkpointer, nothing saved')
    super().__init__(f'Preempted (SIGTERM) at step {step}; {where}. Re-run '
                     'the same command to resume.')


class _PreemptionWatch:
  """Tells when to stop for a SIGTERM (preemption) at a step all agree on.

  Multi-process runs use JAX's preemption sync point (the coordination
  service picks one step for every process); a single process installs its
  own SIGTERM handler for the duration of `fit`.
  """

  def __init__(self, enabled: bool):
    self._flag = False
    self._previous = None
    self._multi = enabled and jax.process_count() > 1
    if (enabled and not self._multi
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service not running: no sync point
        self._multi = False
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _default_guard(name: str) -> bool:
  return 'loss' in name or 'grad_norm' in name


def check_finite(metrics: Mapping[str, Any],
                 keys: Sequence[str] | None = None
                 ) -> tuple[str, float] | None:
  """Returns (name, value) of the first non-finite guarded metric, or None."""
  # Losses first: a NaN loss is the cause, a NaN gradient norm its echo.
  for name in sorted(metrics, key=lambda n: ('loss' not in n, n)):
    if (keys is None and _default_guard(name)) or (keys and name in keys):
      value = np.asarray(metrics[name], dtype=np.float64)
      if not np.all(np.isfinite(value)):
        return name, float(value.flat[np.argmax(~np.isfinite(value.ravel()))])
  return None


def fit(state: Any,
        train_step: Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]],
        batches: Iterator[Any] | None, *,
        num_steps: int,
        checkpointer: checkpoint_lib.Checkpointer | None = None,
        writer: metrics_lib.MetricWriter | None = None,
        log_every: int = 50,
        ckpt_every: int | None = None,
        ckpt_every_minutes: float = 0.0,
        eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
        eval_every: int | None = None,
        data_iterator: Any = None,
        prepare_batch: Callable[[Any], Any] | None = None,
        guard_keys: Sequence[str] | None = None,
        resume: bool = True,
        handle_preemption: bool = True,
        on_state: Callable[[Any], None] | None = None,
        ) -> tuple[Any, dict[str, Any]]:
  """Runs `train_step` until `state.step == num_steps`.

  Args:
    state: initial TrainState (fresh); replaced by the latest checkpoint
      when `resume` and one exists.
    train_step: (state, batch) -> (state, metrics dict of device scalars).
    batches: iterator of host batches, consumed one per step (no lookahead,
      so the saved iterator position matches the saved step); None when
      the step makes its own data (it then gets batch None).
    num_steps: total number of updates of the whole run.
    checkpointer: saves every `ckpt_every` steps and at the end.
    writer: metrics sink (metrics.jsonl, TensorBoard, progress bar).
    log_every: steps between metric fetches (means over the window).
    ckpt_every: steps between checkpoints (None/0: no step cadence).
    ckpt_every_minutes: wall minutes between checkpoints (0: off).
    eval_fn: state -> dict of metrics, run every `eval_every` steps and at
      the end; logged with an 'eval/' prefix.
    eval_every: steps between evaluations (None: only at the end).
    data_iterator: object whose get_state/set_state is checkpointed
      (default: `batches` when it has `get_state`).
    prepare_batch: applied to each host batch before the step (e.g.
      `functools.partial(mesh.shard_batch, mesh=mesh)`).
    guard_keys: metric names checked for NaN/Inf (default: names containing
      'loss' or 'grad_norm').
    resume: restore the latest checkpoint first (if any).
    handle_preemption: on SIGTERM, finish the current step, checkpoint it and
      raise `Preempted` (a re-run resumes from there).
    on_state: called with the live state before the first step (after any
      restore) and after every step, e.g. for an iterator that mines with
      the current params.

  Returns:
    (final state, summary): summary holds the last logged train metrics and
    the last eval metrics ('eval/...'), plus 'steps_per_sec'.

  Raises:
    NonFiniteError: on a NaN/Inf guarded metric (see module doc).
    Preempted: after saving, when SIGTERM arrived (`handle_preemption`).
  """
  if batches is None:  # the step makes its own data (data-free KD)
    batches = itertools.repeat(None)
  if data_iterator is None and hasattr(batches, 'get_state'):
    data_iterator = batches
  summary: dict[str, Any] = {}
  # (step, metrics) of the current log window: device scalars, or host
  # floats restored from a preemption checkpoint.
  pending: list[tuple[int, Mapping[str, Any]]] = []
  last_eval = None
  if checkpointer is not None and resume:
    restored = checkpointer.restore_latest(state, data_iterator)
    if restored is not None:
      state, extras = restored
      summary.update(extras.get(SUMMARY, {}))
      pending = [(int(s), dict(m)) for s, m in extras.get(PENDING, [])]
      last_eval = extras.get(LAST_EVAL)
  step = int(jax.device_get(state.step))
  if on_state is not None:
    on_state(state)
  if writer is not None:
    writer.progress(step)
  window_start, window_steps = time.perf_counter(), 0

  def last_ckpt():
    return None if checkpointer is None else checkpointer.latest_step()

  def fetch_and_guard() -> list[Mapping[str, Any]]:
    """Host values of the pending metrics; NonFiniteError on a NaN/Inf."""
    host = jax.device_get([m for _, m in pending])
    for (s, _), values in zip(pending, host):
      bad = check_finite(values, guard_keys)
      if bad is not None:
        if checkpointer is not None:
          checkpointer.wait()
        raise NonFiniteError(s, bad[0], bad[1], last_ckpt(),
                             None if checkpointer is None
                             else str(checkpointer.directory))
    return host

  def flush() -> None:
    """Fetches pending metrics, guards them, logs the window mean."""
    nonlocal pending, window_start, window_steps
    if not pending:
      return
    host = fetch_and_guard()
    mean = {k: float(np.mean([np.asarray(v[k], np.float64) for v in host]))
            for k in host[-1]}
    elapsed = time.perf_counter() - window_start
    mean['steps_per_sec'] = window_steps / max(elapsed, 1e-9)
    summary.update(mean)
    if writer is not None:
      writer.write(pending[-1][0], mean)
      writer.progress(pending[-1][0], {k: v for k, v in mean.items()
                                       if 'loss' in k})
    pending, window_start, window_steps = [], time.perf_counter(), 0

  def save() -> None:
    """Checkpoints `state`, with what a resumed run needs to log alike."""
    nonlocal last_save, last_save_time
    window = list(zip([s for s, _ in pending], fetch_and_guard()))
    checkpointer.save(state, step=step, data_iterator=data_iterator, extras={
        SUMMARY: metrics_lib.jsonable(summary),
        PENDING: [[s, metrics_lib.jsonable(m)] for s, m in window],
        LAST_EVAL: last_eval})
    last_save, last_save_time = step, time.monotonic()

  last_save, last_save_time = step, time.monotonic()

  def evaluate() -> None:
    nonlocal last_eval
    last_eval = step
    results = {f'eval/{k}': v for k, v in dict(eval_fn(state)).items()}
    summary.update(jax.device_get(results))
    if writer is not None:
      writer.write(step, results)

  preemption = _PreemptionWatch(handle_preemption)
  try:
    while step < num_steps:
      batch = next(batches)
      if prepare_batch is not None:
        batch = prepare_batch(batch)
      state, step_metrics = train_step(state, batch)
      if on_state is not None:
        on_state(state)
      step += 1
      window_steps += 1
      pending.append((step, step_metrics))
      if step % log_every == 0 or step == num_steps:
        flush()
      elif writer is not None:
        writer.progress(step)
      if eval_fn is not None and eval_every and step % eval_every == 0:
        evaluate()
      if checkpointer is not None and step < num_steps and (
          (ckpt_every and step % ckpt_every == 0) or (
              ckpt_every_minutes > 0 and time.monotonic() - last_save_time
              >= 60.0 * ckpt_every_minutes)):
        save()
      if preemption.reached(step):
        if checkpointer is not None:
          if last_save != step:
            save()
          checkpointer.wait()
        else:
          flush()
        raise Preempted(step, None if checkpointer is None
                        else str(checkpointer.directory))
  finally:
    preemption.close()
  flush()
  if eval_fn is not None and last_eval != step:
    evaluate()
  if checkpointer is not None:
    if last_save != step and checkpointer.latest_step() != step:
      save()
    checkpointer.wait()
  logging.info('fit: finished at step %d', step)
  return state, summary
