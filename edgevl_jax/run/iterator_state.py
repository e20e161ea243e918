"""The data-iterator item of a checkpoint, and the checkpoint errors.

Each process saves `iterator.get_state()` as DATA/process_<i>-of-<n>.json
(a grain iterator, or anything with get_state / set_state), so a resumed run
reads exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CorruptCheckpointError(ValueError):
  """A checkpoint folder exists but cannot be read back."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint that does not fit the run's state."""


def one_line(error: BaseException, limit: int = 240) -> str:
  """The first line of an error, shortened (TensorStore errors are huge)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = text or type(error).__name__
  return text if len(text) <= limit else text[:limit] + '...'


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` per process as JSON (dict or bytes state)."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / (f'process_{jax.process_index()}-of-'
                        f'{jax.process_count()}.json')

  def save(self, directory: epath.Path, args: 'DataSave') -> None:
    state = args.item.get_state()
    if isinstance(state, bytes):
      record = {'kind': 'bytes', 'state': state.decode()}
    else:
      record = {'kind': 'json', 'state': state}
    self._file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: 'DataRestore') -> Any:
    path = self._file(directory)
    if not path.exists():
      raise ValueError(
          f'{path} does not exist: the checkpoint was written by a run with a '
          f'different process count or without a data iterator.')
    try:
      record = json.loads(path.read_text())
      state = record['state']
      state = state.encode() if record['kind'] == 'bytes' else state
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f'{path} holds no readable data-iterator state '
                       f'({one_line(e)}).') from e
    state = _adopt_address_repr(state, args.item, path)
    try:
      args.item.set_state(state)
    except Exception as e:  # pylint: disable=broad-except
      # Readable state that this iterator refuses (another dataset, subset
      # or batch size): a config change, not damage.
      raise IncompatibleCheckpointError(
          f'{path}: the data iterator refuses the saved position '
          f'({one_line(e)}); the data config changed since this checkpoint.'
          ' Use a fresh --workdir or the config that wrote it.') from e
    start = getattr(args.item, 'start_prefetch', None)
    if callable(start):
      start()
    return args.item

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def _adopt_address_repr(state: Any, item: Any, path: Any) -> Any:
  """Migrates a grain state whose data source was recorded by address.

  Grain compares repr(data_source) on restore; the previous layout's
  subset sources had no repr of their own, so their checkpoints hold
  '<... object at 0x...>', which no later process can match. Such a state
  adopts the current source's repr; grain still checks the sampler (record
  count, seed, shuffle), which identifies the stream.
  """
  if not isinstance(state, bytes) or b' object at 0x' not in state:
    return state
  try:
    saved, current = json.loads(state), json.loads(item.get_state())
  except (ValueError, TypeError, AttributeError):
    return state
  if ' object at 0x' not in str(saved.get('data_source', '')):
    return state
  logging.warning('%s records its data source by memory address (a '
                  'checkpoint of the previous layout); matching it by its '
                  'sampler instead.', path)
  saved['data_source'] = current.get('data_source')
  return json.dumps(saved).encode()
