"""Job 'pipeline': runs a sequence of stages, each its own job.

Config:
  config.trainer = 'pipeline'
  config.stages = [stage, ...]   # list of ConfigDicts
  config.stop_after = ''         # optional: run stages up to this name
  each stage: name (unique, [A-Za-z0-9_-]), trainer, + its own keys.
  CLI override of a stage key: --config.stages[1].num_steps=100, or by
  name: --config.stages.dual_modality_kd.num_steps=100.
  Top-level keys (seed, the run keys, shared data keys) flow into every
  stage that does not set them (`registry.pipeline_config`).

Stage i runs in DIR/<i>_<name>/ exactly as `main` would run it there (its
metrics.jsonl, checkpoints, report.json). A stage whose folder already has
report.json is skipped on re-run (a killed pipeline resumes at the stage that
was running, which itself resumes from its latest checkpoint).

Passing outputs forward: any string value in a stage config of the form
  '@<stage_name>/workdir'         -> that earlier stage's folder, or
  '@<stage_name>/<dotted.key>'    -> that value of its report.json
is replaced before the stage runs (e.g. init_from='@dual_modality_kd/workdir').
References must name an earlier stage. All stages are validated before the
first one runs; validators skip only the checks of values that are still
references (`config_lib.is_reference`), which are checked once resolved.

Paths: a report value whose key ends in `_path` or `_dir` is a path relative
to the folder of that report.json, so a moved or copied workdir resumes and
never reads its original's files. References to such keys resolve against
the stage's current folder.

Changed stages: each stage folder records the stage's config as given
(references unresolved) in config.json. When a finished stage's recorded
config differs from this run's in a key that is not resume-safe (possible
only with --on_config_change=warn, or when the top-level config.json was
removed), that stage and every stage that refers to it, directly or through
others, are re-run; their old folders are moved to
DIR/<i>_<name>.stale-<time>/ (nothing is deleted).

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

import logging
import os
import re
import time
from typing import Any, Mapping

import ml_collections

from edgevl_jax.run import config as config_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import registry
from edgevl_jax.run import runner
from edgevl_jax.utils import io

TIMING_FILE = 'stage_seconds.json'
RESOLVED_FILE = 'resolved_config.json'
_NAME = re.compile(r'^[A-Za-z0-9_-]+$')
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {'stages': f(None, 'the stage configs, in order', list),
          'stop_after': f('', 'run the stages up to this name only')}



def _stages(config: Any) -> list[Any]:
  """The stages to run: all, or up to and including config.stop_after."""
  stages = config.get('stages')
  if not stages:
    raise ValueError('config.stages must be a non-empty list of stage '
                     'configs (each with `name` and `trainer`).')
  stages = list(stages)
  stop = config.get('stop_after') or ''
  if stop:
    names = [s.get('name') for s in stages]
    if stop not in names:
      raise ValueError(f'config.stop_after={stop!r} is not a stage name; '
                       f'choose one of {names}.')
    stages = stages[:names.index(stop) + 1]
  return stages


def stage_dir(workdir: str, index: int, name: str) -> str:
  """DIR/<index>_<name>."""
  return os.path.join(workdir, f'{index}_{name}')


def validate(config: Any) -> None:
  """Checks names, jobs and references of every stage; no compute."""
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
      job = registry.get_job(stage.trainer)
      if hasattr(job, 'validate'):
        job.validate(stage)
    except ValueError as e:
      raise ValueError(f'config.stages[{i}] ({name}): {e}') from e
    seen.append(name)


def _references(stage: Any) -> list[tuple[str, str]]:
  flat = config_lib.flatten(config_lib.to_dict(stage))
  return [(k, v) for k, v in flat.items() if config_lib.is_reference(v)]


def is_path_key(key: str) -> bool:
  """Report keys holding paths (relative to their report's folder)."""
  return key.rsplit('.', 1)[-1].endswith(metrics_lib.PATH_KEY_SUFFIXES)


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
      if key == 'workdir':
        return workdir
      found = _lookup(report, key, value)
      if is_path_key(key) and isinstance(found, str):
        return os.path.normpath(os.path.join(workdir, found))
      return found
    return value
  resolved = ml_collections.ConfigDict(sub(config_lib.to_dict(stage)))
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


def _changed(stage: Any, sdir: str) -> list[str]:
  """Non-resume-safe keys in which the stage's recorded config differs."""
  path = os.path.join(sdir, 'config.json')
  if not os.path.exists(path):
    return []
  saved = io.read_json(path, fix=f'delete {sdir} to re-run the stage')
  return [k for k in config_lib.diff_keys(saved, config_lib.to_dict(stage), ignore_added=True)
          if k.rsplit('.', 1)[-1] not in config_lib.RESUME_SAFE_KEYS]


def stages_to_rerun(config: Any, workdir: str) -> dict[str, list[str]]:
  """{stage name: why} for stages whose folder must be redone.

  A stage is redone when its recorded config changed (non-resume-safe keys)
  or when it refers, directly or through others, to a stage being redone.
  """
  redo: dict[str, list[str]] = {}
  for i, stage in enumerate(_stages(config)):
    sdir = stage_dir(workdir, i, stage.name)
    changed = _changed(stage, sdir)
    if changed:
      redo[stage.name] = [f'config keys {changed} changed']
    upstream = sorted({ref[1:].split('/', 1)[0]
                       for _, ref in _references(stage)} & set(redo))
    if upstream and stage.name not in redo:
      redo[stage.name] = [f'it uses stage(s) {upstream}, which are redone']
  return redo


def _set_aside(sdir: str) -> str:
  target = f'{sdir}.stale-{time.strftime("%Y%m%d-%H%M%S")}'
  os.rename(sdir, target)
  return target


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Runs (or skips finished) stages in order; returns the merged report."""
  workdir = ctx.workdir
  main_process = metrics_lib.is_main_process()
  redo = stages_to_rerun(config, workdir)
  for i, stage in enumerate(_stages(config)):
    sdir = stage_dir(workdir, i, stage.name)
    why = redo.get(stage.name)
    if why and os.path.exists(sdir):
      moved = _set_aside(sdir) if main_process else '(process 0)'
      logging.warning('pipeline: stage %s is redone because %s; its old '
                      'folder was moved to %s.', stage.name, why[0], moved)
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
        secs = float(io.read_json(
            timing_path, fix='delete it (it only records seconds)')['seconds'])
    else:
      logging.info('pipeline: stage %d (%s, job %s) in %s', i, name,
                   stage.trainer, sdir)
      job, resolved = registry.validate(resolve(stage, outputs))
      if main_process:
        os.makedirs(sdir, exist_ok=True)
        io.atomic_write_json(os.path.join(sdir, 'config.json'),
                             config_lib.to_dict(stage))
        io.atomic_write_json(os.path.join(sdir, RESOLVED_FILE),
                             config_lib.to_dict(resolved))
      start = time.perf_counter()
      report = runner.execute(job, ctx.child(sdir, resolved))
      secs = time.perf_counter() - start
      if main_process:
        # Timing first, report last: report.json marks the stage as done.
        io.atomic_write_json(timing_path, {'seconds': secs})
      metrics_lib.write_report(sdir, report)
    with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                  progress=False) as writer:
      writer.write(i, {'stage': name, 'seconds': secs,
                       'skipped': skipped})
    outputs[name] = (sdir, report)
    # Paths in the merged report are relative to the pipeline's folder.
    merged = deep_merge(merged, metrics_lib.rebase_paths(
        report, os.path.relpath(sdir, workdir)))
    stages_report[name], workdirs[name], seconds[name] = (
        report, os.path.relpath(sdir, workdir), secs)
  seconds['total'] = sum(seconds.values())
  merged.update(stages=stages_report, workdirs=workdirs, seconds=seconds)
  return merged
