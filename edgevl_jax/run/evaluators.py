"""Evaluators run during training, and KeepBest, the model-selection callback.

An evaluator is any object with `run(state) -> {name: number}` (the
big_vision protocol); the runner calls every evaluator of a TrainSpec every
`eval_every` steps and logs the numbers as 'eval/<name>'. `KeepBest` watches
one of those numbers and saves the state whenever it improves; its record
(best value, step, the other numbers at that step) lives in
WORKDIR/best.json, written atomically, so a resumed run keeps selecting
against the true best so far.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax

from edgevl_jax.utils import io

BEST_FILE = 'best.json'


class Evaluator(Protocol):
  """Anything with `run(state) -> {name: number}`."""

  def run(self, state: Any) -> Mapping[str, float]:
    ...


class FunctionEvaluator:
  """Wraps `fn(state) -> dict` as an Evaluator."""

  def __init__(self, fn: Callable[[Any], Mapping[str, float]]):
    self.fn = fn

  def run(self, state: Any) -> Mapping[str, float]:
    return self.fn(state)


class KeepBest:
  """Saves the state when `metric` improves (higher is better by default).

  Args:
    workdir: where best.json lives.
    metric: name of an evaluator number (without the 'eval/' prefix).
    save: called as save(state, record) when the metric improves.
    mode: 'max' or 'min'.
  """

  def __init__(self, workdir: str, metric: str,
               save: Callable[[Any, dict[str, Any]], None], mode: str = 'max'):
    if mode not in ('max', 'min'):
      raise ValueError(f"KeepBest mode must be 'max' or 'min', found {mode!r}.")
    self.path = os.path.join(workdir, BEST_FILE)
    self.metric, self.save, self.mode = metric, save, mode
    self.record: dict[str, Any] = {}
    if os.path.exists(self.path):
      self.record = io.read_json(self.path, fix='delete it to restart model '
                                 'selection from this run\'s evaluations')

  def better(self, value: float) -> bool:
    if 'value' not in self.record:
      return True
    best = self.record['value']
    return value > best if self.mode == 'max' else value < best

  def __call__(self, state: Any, results: Mapping[str, float]) -> None:
    if self.metric not in results:
      raise ValueError(f'KeepBest: the evaluators gave no {self.metric!r}; '
                       f'they gave {sorted(results)}.')
    value = float(results[self.metric])
    if not self.better(value):
      return
    record = {'metric': self.metric, 'value': value,
              'step': int(jax.device_get(state.step)),
              'results': {k: float(v) for k, v in results.items()}}
    self.save(state, record)
    self.record = record
    if jax.process_index() == 0:
      io.atomic_write_json(self.path, record)


def run_all(evaluators: Sequence[Evaluator], state: Any,
            callbacks: Sequence[Callable[[Any, Mapping[str, float]], None]]
            = ()) -> dict[str, float]:
  """Every evaluator's numbers (names must not clash), then the callbacks."""
  results: dict[str, float] = {}
  for evaluator in evaluators:
    for name, value in dict(evaluator.run(state)).items():
      if name in results:
        raise ValueError(f'Two evaluators report {name!r}; rename one.')
      results[name] = value
  for callback in callbacks:
    callback(state, results)
  return results
