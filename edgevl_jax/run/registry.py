"""Trainer registry: `config.trainer` -> a module, imported lazily.

A trainer is a module exposing

  train_and_evaluate(config, workdir) -> dict   # the run's report
  validate_config(config) -> None               # optional; raise ValueError

`config.trainer` is either a short name (`'dual_modality_kd'` ->
`edgevl_jax.train.dual_modality_kd`) or a fully dotted module path
(`'tests.toy_trainer'`). Only the named module is imported, so a trainer's
heavy dependencies cost nothing to the others.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

PACKAGE = 'edgevl_jax.train'


def module_name(trainer: str) -> str:
  """The importable module path for a `config.trainer` value."""
  return trainer if '.' in trainer else f'{PACKAGE}.{trainer}'


def get_trainer(trainer: str) -> types.ModuleType:
  """Imports the trainer module; ValueError naming it if absent or invalid."""
  if not isinstance(trainer, str) or not trainer:
    raise ValueError(f'config.trainer must be a non-empty module name, found '
                     f'{trainer!r}.')
  name = module_name(trainer)
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    # Only translate "this trainer does not exist", not a missing dependency
    # deep inside an existing trainer.
    if e.name is not None and name.startswith(e.name):
      raise ValueError(
          f'config.trainer={trainer!r}: no module {name!r}. Use the name of a '
          f'module in {PACKAGE} or a dotted module path.') from e
    raise
  if not callable(getattr(module, 'train_and_evaluate', None)):
    raise ValueError(f'config.trainer={trainer!r}: module {name!r} has no '
                     'train_and_evaluate(config, workdir) function.')
  return module


def validate(config: Any) -> types.ModuleType:
  """Resolves `config.trainer` and runs its `validate_config`; no compute.

  Returns:
    The trainer module.
  """
  if 'trainer' not in config:
    raise ValueError('config.trainer is missing; set it to a trainer name, '
                     'e.g. config.trainer = "dual_modality_kd".')
  module = get_trainer(config.trainer)
  check = getattr(module, 'validate_config', None)
  if check is not None:
    check(config)
  return module
