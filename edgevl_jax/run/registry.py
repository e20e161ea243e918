"""Jobs by name: `config.trainer` -> a module of edgevl_jax.jobs.

A job module exports
  defaults() -> config.Schema          every key it reads (the only schema)
  validate(config) -> None             optional cross-key checks, no compute
and either
  build(config, ctx) -> runner.TrainSpec    a training job: the runner owns
                                            state, loop, checkpoints, outputs
  run(config, ctx) -> dict                  a one-shot job (or one that calls
                                            ctx.train several times)
Only the named module is imported, so a job's heavy dependencies cost
nothing to the others. `config.trainer` may also be a dotted module path
(tests use 'tests.toy_trainer'). Old names keep working for one release
(ALIASES, with a warning).
"""
from __future__ import annotations

import importlib
import logging
import types
from typing import Any

import ml_collections

from edgevl_jax.run import config as config_lib

PACKAGE = 'edgevl_jax.jobs'
JOBS = ('clip_pretrain', 'pseudo_labels', 'dual_modality_kd',
        'qat_contrastive', 'zero_shot_eval', 'export', 'classifier',
        'distill_classifier', 'datafree_kd', 'cka_report', 'pipeline')
# Names of the previous layout -> today's job.
ALIASES = {'evaluate': 'zero_shot_eval', 'export_stage': 'export',
           'cka': 'cka_report'}


def canonical(name: str) -> str:
  if name in ALIASES:
    logging.warning('config.trainer=%r is the old name of %r; it keeps '
                    'working for this release.', name, ALIASES[name])
    return ALIASES[name]
  return name


def module_name(trainer: str) -> str:
  """The importable module path for a `config.trainer` value."""
  trainer = canonical(trainer)
  return trainer if '.' in trainer else f'{PACKAGE}.{trainer}'


def get_job(trainer: str) -> types.ModuleType:
  """Imports the job module; ValueError naming it if absent or invalid."""
  if not isinstance(trainer, str) or not trainer:
    raise ValueError(f'config.trainer must be a job name, found {trainer!r}; '
                     f'jobs: {list(JOBS)}.')
  name = module_name(trainer)
  if '.' not in trainer and canonical(trainer) not in JOBS:
    raise ValueError(f'config.trainer={trainer!r} is not a job; choose one of '
                     f'{list(JOBS)} (or a dotted module path).')
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    # Only translate "this job does not exist", not a missing dependency
    # deep inside an existing job.
    if e.name is not None and name.startswith(e.name):
      raise ValueError(f'config.trainer={trainer!r}: no module {name!r}.'
                       ) from e
    raise
  if not callable(getattr(module, 'defaults', None)) or not (
      callable(getattr(module, 'build', None))
      or callable(getattr(module, 'run', None))):
    raise ValueError(f'config.trainer={trainer!r}: module {name!r} needs '
                     'defaults() and build(config, ctx) or run(config, ctx).')
  return module


def schema(trainer: str) -> config_lib.Schema:
  """RUN_DEFAULTS + the job's defaults() (the job's keys win)."""
  job = dict(get_job(trainer).defaults())
  return {'trainer': config_lib.field(trainer, 'the job to run'),
          'name': config_lib.field('', 'the stage name, in a pipeline'),
          **config_lib.RUN_DEFAULTS, **job}


def job_config(trainer: str, **values: Any) -> ml_collections.ConfigDict:
  """A job's complete config: its defaults with `values` set (unlocked).

  For config files and presets; `values` may hold FieldReferences (shared
  with a pipeline's top level) and '@stage/key' references.
  """
  return config_lib.build(schema(trainer), {'trainer': trainer, **values},
                          where='config')


def _ref(value: Any) -> Any:
  """A FieldReference (nested ConfigDict of them for a mapping)."""
  if isinstance(value, ml_collections.FieldReference):
    return value
  if isinstance(value, config_lib.Field):
    value = config_lib.schema_config({'x': value}).get_ref('x')
    return value
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _ref(v) for k, v in value.items()})
  return ml_collections.FieldReference(value)


def pipeline_config(stages: list[tuple[str, str, dict[str, Any]]],
                    **shared: Any) -> ml_collections.ConfigDict:
  """A pipeline whose top-level keys flow into every stage.

  Args:
    stages: (name, job, values) per stage; values are that job's keys.
    **shared: top-level keys (e.g. dataset, data_dir, image_size) given to
      every stage that has such a key and does not set it itself.

  The run keys (seed, mesh, cadence, ...) are shared the same way, so
  `--config.seed=3` changes every stage's seed, while
  `--config.stages.NAME.seed=4` (or `stages[i]`) changes one stage.
  """
  top = ml_collections.ConfigDict({'trainer': 'pipeline', 'stop_after': ''})
  refs = {}
  for key, spec in config_lib.RUN_DEFAULTS.items():
    refs[key] = _ref(dict(spec.default) if isinstance(spec.default, dict)
                     else spec)
  for key, value in shared.items():
    refs[key] = _ref(value)
  for key, ref in refs.items():
    top[key] = ref
  built = []
  for name, trainer, values in stages:
    keys = schema(trainer)
    given = {k: v for k, v in refs.items() if k in keys and k not in values}
    built.append(job_config(trainer, **given, **values, name=name))
  top.stages = built
  return top


def _pipeline_schema(config: Any) -> config_lib.Schema:
  """Pipeline keys + run keys + any key of a stage (shared values)."""
  out = dict(schema('pipeline'))
  for stage in config_lib.get(config, 'stages') or []:
    trainer = config_lib.get(stage, 'trainer')
    if isinstance(trainer, str) and canonical(trainer) != 'pipeline':
      for key, spec in schema(trainer).items():
        out.setdefault(key, spec)
  return out


def complete(config: Any, where: str = 'config'
             ) -> ml_collections.ConfigDict:
  """`config` with every default of its job filled in; unknown keys refused.

  A pipeline's stages are completed one by one (each with its own job); a
  key a stage does not set takes the pipeline's top-level value when there
  is one (shared keys and run keys), else the job's default.
  """
  trainer = config_lib.require(config, 'trainer', types=str)
  if canonical(trainer) != 'pipeline':
    return config_lib.build(schema(trainer), config, where=where)
  given = config_lib.to_dict(config)
  top = config_lib.build(_pipeline_schema(config),
                         {k: v for k, v in given.items() if k != 'stages'},
                         where=where)
  stages = []
  for i, stage in enumerate(given.get('stages') or []):
    if not isinstance(stage, dict) or 'trainer' not in stage:
      raise ValueError(f'{where}.stages[{i}] must be a stage config with a '
                       'trainer (and a name).')
    keys = schema(stage['trainer'])
    inherited = {k: top[k] for k in given if k in keys and k not in stage
                 and k not in ('trainer', 'name', 'stages')}
    for k in config_lib.RUN_DEFAULTS:
      if k not in stage:
        inherited[k] = top[k]
    stages.append(config_lib.build(keys, {**config_lib.to_dict(inherited),
                                          **stage},
                                   where=f'{where}.stages[{i}]'))
  top.stages = stages
  return top


def validate(config: Any) -> tuple[types.ModuleType, ml_collections.ConfigDict]:
  """Completes the config and runs the job's checks; no compute.

  Returns:
    (job module, the complete, locked config).
  """
  complete_config = complete(config)
  module = get_job(complete_config.trainer)
  check = getattr(module, 'validate', None)
  if check is not None:
    check(complete_config)
  complete_config.lock()
  return module, complete_config
