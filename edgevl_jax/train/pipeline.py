"""Trainer 'pipeline': runs a sequence of stages, each its own trainer.

Config:
  config.trainer = 'pipeline'
  config.stages = [stage, ...]   # list of ConfigDicts
  each stage: name (unique, [A-Za-z0-9_-]), trainer, + its own keys.
  CLI override of a stage key: --config.stages[1].num_steps=100

Stage i runs in DIR/<i>_<name>/ exactly as `main` would run it there (its
metrics.jsonl, checkpoints, report.json). A stage whose folder already has
report.json is skipped on re-run (a killed pipeline resumes at the stage that
was running, which itself resumes from its latest checkpoint).

Passing outputs forward: any string value in a stage config of the form
  '@<stage_name>/workdir'         -> that earlier stage's folder, or
  '@<stage_name>/<dotted.key>'    -> that value of its report.json
is replaced before the stage runs (e.g. init_from='@dual_modality_kd/workdir').
References must name an earlier stage. All stages are validated before the
first one runs; a `validate_config` error about a key that still holds a
reference is deferred until that reference is resolved.

DIR/metrics.jsonl gets one line per stage (step = stage index) with its
name, seconds and whether it was skipped.

The pipeline's report.json is the deep merge of the stage reports in order
(later stages win on equal keys), plus
  stages:   {name: that stage's report},
  workdirs: {name: its folder},
  seconds:  {name: wall seconds of the run that finished the stage (kept
             from stage_seconds.json when skipped), 'total': their sum}.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Mapping

import ml_collections

from edgevl_jax.train import config_utils
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import registry

TIMING_FILE = 'stage_seconds.json'
_NAME = re.compile(r'^[A-Za-z0-9_-]+$')


def _stages(config: Any) -> list[Any]:
  stages = config.get('stages')
  if not stages:
    raise ValueError('config.stages must be a non-empty list of stage '
                     'configs (each with `name` and `trainer`).')
  return list(stages)


def stage_dir(workdir: str, index: int, name: str) -> str:
  """DIR/<index>_<name>."""
  return os.path.join(workdir, f'{index}_{name}')


def validate_config(config: Any) -> None:
  """Checks names, trainers and references of every stage; no compute."""
  seen: list[str] = []
  for i, stage in enumerate(_stages(config)):
    name = stage.get('name')
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f'config.stages[{i}].name must match [A-Za-z0-9_-]+, '
                       f'found {name!r}.')
    if name in seen:
      raise ValueError(f'config.stages[{i}].name={name!r} is used twice; '
                       'stage names must be unique.')
    if stage.get('trainer') == 'pipeline':
      raise ValueError(f'config.stages[{i}].trainer cannot be "pipeline".')
    for key, ref in _references(stage):
      target = ref[1:].split('/', 1)[0]
      if target not in seen:
        raise ValueError(
            f'config.stages[{i}].{key}={ref!r} refers to stage {target!r}, '
            f'which is not an earlier stage (earlier: {seen}).')
    try:
      registry.validate(stage)
    except ValueError as e:
      # A value still holding an '@' reference is checked once resolved.
      if not any(key.rsplit('.', 1)[-1] in str(e)
                 for key, _ in _references(stage)):
        raise ValueError(f'config.stages[{i}] ({name}): {e}') from e
    seen.append(name)


def _references(stage: Any) -> list[tuple[str, str]]:
  flat = config_utils.flatten(config_utils.to_dict(stage))
  return [(k, v) for k, v in flat.items()
          if isinstance(v, str) and v.startswith('@') and '/' in v]


def _lookup(report: Mapping[str, Any], key: str, ref: str) -> Any:
  node: Any = report
  for part in key.split('.'):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f'Reference {ref!r}: key {key!r} is not in that '
                       f"stage's report.json (top-level keys: "
                       f'{sorted(report)}).')
    node = node[part]
  return node


def resolve(stage: Any, outputs: Mapping[str, tuple[str, dict[str, Any]]]
            ) -> ml_collections.ConfigDict:
  """Copy of `stage` with '@stage/...' strings replaced (see module doc).

  Args:
    stage: a stage ConfigDict.
    outputs: {stage name: (workdir, report)} of the finished stages.
  """
  def sub(value):
    if isinstance(value, Mapping):
      return {k: sub(v) for k, v in value.items()}
    if isinstance(value, list):
      return [sub(v) for v in value]
    if isinstance(value, str) and value.startswith('@') and '/' in value:
      name, key = value[1:].split('/', 1)
      if name not in outputs:
        raise ValueError(f'Reference {value!r}: no finished stage {name!r} '
                         f'(finished: {sorted(outputs)}).')
      workdir, report = outputs[name]
      return workdir if key == 'workdir' else _lookup(report, key, value)
    return value
  resolved = ml_collections.ConfigDict(sub(config_utils.to_dict(stage)))
  resolved.lock()
  return resolved


def deep_merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
  """Recursively merges `new` into a copy of `base` (new wins on leaves)."""
  out = dict(base)
  for k, v in new.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = deep_merge(dict(out[k]), v)
    else:
      out[k] = v
  return out


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs (or skips finished) stages in order; returns the merged report."""
  validate_config(config)
  outputs: dict[str, tuple[str, dict[str, Any]]] = {}
  merged: dict[str, Any] = {}
  stages_report, workdirs, seconds = {}, {}, {}
  for i, stage in enumerate(_stages(config)):
    name = stage.name
    sdir = stage_dir(workdir, i, name)
    report = metrics_lib.read_report(sdir)
    timing_path = os.path.join(sdir, TIMING_FILE)
    skipped = report is not None
    if skipped:
      logging.info('pipeline: stage %s finished earlier, skipped (%s)',
                   name, sdir)
      secs = 0.0
      if os.path.exists(timing_path):
        with open(timing_path) as f:
          secs = float(json.load(f)['seconds'])
    else:
      logging.info('pipeline: stage %d (%s, trainer %s) in %s', i, name,
                   stage.trainer, sdir)
      resolved = resolve(stage, outputs)
      module = registry.validate(resolved)
      main_process = metrics_lib.is_main_process()
      if main_process:
        os.makedirs(sdir, exist_ok=True)
        metrics_lib.atomic_write_text(
            os.path.join(sdir, 'config.json'),
            json.dumps(config_utils.to_dict(resolved), indent=2,
                       sort_keys=True))
      start = time.perf_counter()
      # JSON types, as a skipped stage's report read back from disk has.
      report = metrics_lib.jsonable(
          dict(module.train_and_evaluate(resolved, sdir)))
      secs = time.perf_counter() - start
      if main_process:
        # Timing first, report last: report.json marks the stage as done.
        metrics_lib.atomic_write_text(timing_path,
                                      json.dumps({'seconds': secs}))
      metrics_lib.write_report(sdir, report)
    with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                  progress=False) as writer:
      writer.write(i, {'stage': name, 'seconds': secs,
                       'skipped': skipped})
    outputs[name] = (sdir, report)
    merged = deep_merge(merged, report)
    stages_report[name], workdirs[name], seconds[name] = report, sdir, secs
  seconds['total'] = sum(seconds.values())
  merged.update(stages=stages_report, workdirs=workdirs, seconds=seconds)
  return merged
