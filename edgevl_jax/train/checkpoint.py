"""Atomic, resumable checkpoints of the student (orbax CheckpointManager).

Each checkpoint `<dir>/<step>/` holds three items:
  state/  the TrainState pytree (sharded jax.Arrays are written per shard by
          every process and restored directly onto the target shardings),
  data/   the data iterator's state, one JSON file per process (grain
          iterators or anything with `get_state()` / `set_state()`),
  extras/ a small JSON dict (e.g. best metric so far, epoch counters).
Orbax writes into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint intact; unfinished temporary folders
are ignored on restore. Teachers are never saved here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, EXTRAS = 'state', 'data', 'extras'


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
    record = json.loads(path.read_text())
    state = record['state']
    args.item.set_state(state.encode() if record['kind'] == 'bytes' else state)
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


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array leaf of `tree`."""
  def to_abstract(x):
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=getattr(x, 'sharding', None))
    if isinstance(x, np.ndarray):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
  return jax.tree.map(to_abstract, tree)


def _key_str(path) -> str:
  """'params.Dense_0.kernel' from a jax key path."""
  names = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
           for k in path)
  return '.'.join(str(n) for n in names)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key_str(p): tuple(getattr(x, 'shape', ())) for p, x in leaves}


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run in `directory`.

  Args:
    directory: folder of the checkpoints (created), e.g. WORKDIR/checkpoints.
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (arrays are copied to host
      before `save` returns, so donating the state afterwards is safe).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={STATE: ocp.StandardCheckpointHandler(),
                         DATA: DataIteratorHandler(),
                         EXTRAS: ocp.JsonCheckpointHandler()})
    except Exception as e:  # orbax raises many types for a bad folder.
      raise ValueError(f'Cannot open the checkpoint folder {self.directory}: '
                       f'{e}. Use a fresh --workdir or fix the folder.') from e

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: Any, *, step: int | None = None,
           data_iterator: Any = None,
           extras: Mapping[str, Any] | None = None, force: bool = True) -> bool:
    """Saves `state` (+ iterator state, + JSON extras) as checkpoint `step`.

    Args:
      state: the TrainState (or any pytree of arrays).
      step: checkpoint number; default `int(state.step)` (a host sync).
      data_iterator: object with get_state(); its position is saved.
      extras: small JSON-able dict.
      force: bypass orbax's save-interval policy (the caller decides when
        to save). A step that already has a checkpoint is never rewritten.

    Returns:
      Whether a checkpoint was written.
    """
    step = int(state.step) if step is None else int(step)
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state),
             EXTRAS: ocp.args.JsonSave(dict(extras or {}))}
    if data_iterator is not None:
      items[DATA] = DataSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              force=force)

  def restore(self, step: int, target: Any, data_iterator: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` onto `target`'s structure and shardings.

    Args:
      step: the checkpoint number.
      target: a TrainState of arrays or ShapeDtypeStructs with shardings
        (e.g. the freshly initialised state, or `abstract_like(state)`).
      data_iterator: if given, its state is set to the saved position.

    Returns:
      (state, extras).

    Raises:
      ValueError: naming the path and the first mismatching key when the
        checkpoint does not fit `target`, or when it cannot be read.
    """
    path = self.directory / str(step)
    abstract = abstract_like(target)
    self._check_compatible(step, path, abstract)
    items = {STATE: ocp.args.StandardRestore(abstract),
             EXTRAS: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[DATA] = DataRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise ValueError(f'Cannot restore checkpoint {path}: {e}. Use a fresh '
                       '--workdir, or the config that wrote it.') from e
    return restored[STATE], dict(restored[EXTRAS] or {})

  def restore_latest(self, target: Any, data_iterator: Any = None
                     ) -> tuple[Any, dict[str, Any]] | None:
    """`restore` of the newest checkpoint; None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    logging.info('Restoring checkpoint %s/%d', self.directory, step)
    return self.restore(step, target, data_iterator)

  def _check_compatible(self, step: int, path: epath.Path,
                        abstract: Any) -> None:
    try:
      meta = self.item_metadata(step)
    except Exception as e:
      raise ValueError(f'Checkpoint {path} is unreadable: {e}. Use a fresh '
                       '--workdir or delete the broken step folder.') from e
    if meta is None:
      return
    saved = _shapes(meta)
    wanted = _shapes(abstract)
    # Target order (step, params, opt_state...): the first key named is the
    # most telling one.
    for key in list(wanted) + [k for k in saved if k not in wanted]:
      if key not in saved:
        raise ValueError(f'Checkpoint {path} has no entry {key!r} that this '
                         'run expects (model/optimiser config changed?). Use a '
                         'fresh --workdir or the config that wrote it.')
      if key not in wanted:
        raise ValueError(f'Checkpoint {path} has entry {key!r} that this run '
                         'does not expect (model/optimiser config changed?). '
                         'Use a fresh --workdir or the config that wrote it.')
      if saved[key] != wanted[key]:
        raise ValueError(f'Checkpoint {path}: {key!r} has shape {saved[key]} '
                         f'but this run expects {wanted[key]}. Use a fresh '
                         '--workdir or the config that wrote it.')

  def item_metadata(self, step: int) -> Any:
    """The saved TrainState's tree of array metadata (shapes, dtypes)."""
    return self._manager.item_metadata(step)[STATE]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_params(directory: str | os.PathLike, step: int | None = None,
                collection: str = 'params') -> Any:
  """Reads one collection of a saved TrainState as host numpy arrays.

  For later stages that start from an earlier stage's student (they need its
  params, not its optimiser). `directory` is a checkpoint folder or a workdir
  containing `checkpoints/`.

  Args:
    directory: checkpoint folder or workdir.
    step: checkpoint number (default: latest).
    collection: TrainState field to return ('params' or 'model_state').

  Returns:
    The nested dict of numpy arrays.
  """
  root = epath.Path(directory)
  if (root / 'checkpoints').exists():
    root = root / 'checkpoints'
  if not root.exists():
    raise ValueError(f'No checkpoint folder {root}; run the stage that writes '
                     'it first, or point to the right workdir.')
  with Checkpointer(root, async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f'No checkpoint in {root}; run the stage that writes '
                       'it first, or point to the right workdir.')
    meta = ckpt.item_metadata(step)
    if collection not in meta:
      raise ValueError(f'Checkpoint {root / str(step)} has no {collection!r}; '
                       f'found {sorted(meta)}.')
    sub = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                       dict(meta)[collection])
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub)
    handler = ocp.PyTreeCheckpointHandler()
    out = handler.restore(root / str(step) / STATE,
                          args=ocp.args.PyTreeRestore(
                              item={collection: sub},
                              restore_args={collection: restore_args},
                              partial_restore=True))
    return out[collection]
