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

Typed PRNG keys (`jax.random.key`, any impl) are stored as their uint32 key
data and restored as typed keys; the compatibility check compares that key
data's shape and dtype.

Damaged checkpoints: `restore_latest` tries the newest checkpoint first; one
that cannot be read (truncated array file, missing or garbled metadata,
garbled extras or iterator state) is named in a warning, moved aside to
`<directory>.corrupt/` (nothing is deleted) and the next older one is tried.
Only when none is intact does it stop, naming every checkpoint it tried. A
checkpoint that reads fine but does not fit the run (another model or
optimiser) is not skipped: that is a config error, reported at once.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from edgevl_jax.run import iterator_state

STATE, DATA, EXTRAS = 'state', 'data', 'extras'
DataIteratorHandler = iterator_state.DataIteratorHandler
DataSave, DataRestore = iterator_state.DataSave, iterator_state.DataRestore
# Checkpoints kept by default: two, so that a damaged newest one has a
# fallback.
DEFAULT_MAX_TO_KEEP = 2
CORRUPT_SUFFIX = '.corrupt'


CorruptCheckpointError = iterator_state.CorruptCheckpointError
IncompatibleCheckpointError = iterator_state.IncompatibleCheckpointError
_one_line = iterator_state.one_line


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process (a restore either works everywhere
  or is retried everywhere with the same older step)."""
  if jax.process_count() == 1:
    return ok
  oks = multihost_utils.process_allgather(np.asarray(ok, np.int32))
  return bool(np.all(oks))


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


def _stored_signature(x: Any) -> tuple[tuple[int, ...], str | None]:
  """(shape, dtype) of a leaf as it is stored in a checkpoint.

  A typed PRNG key array of shape S is stored as its key data, uint32
  S + (2,) for threefry or S + (4,) for rbg keys.
  """
  dtype = getattr(x, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    data = jax.eval_shape(jax.random.key_data,
                          jax.ShapeDtypeStruct(x.shape, dtype))
    return tuple(data.shape), str(data.dtype)
  return tuple(getattr(x, 'shape', ())), None if dtype is None else str(
      np.dtype(dtype))


def _signatures(tree: Any) -> dict[str, tuple[tuple[int, ...], str | None]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key_str(p): _stored_signature(x) for p, x in leaves}


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run in `directory`.

  Args:
    directory: folder of the checkpoints (created), e.g. WORKDIR/checkpoints.
    max_to_keep: number of most recent checkpoints kept (>= 1; the default 2
      leaves a fallback when the newest is damaged).
    async_save: write in a background thread (arrays are copied to host
      before `save` returns, so donating the state afterwards is safe).
  """

  def __init__(self, directory: str | os.PathLike, *,
               max_to_keep: int = DEFAULT_MAX_TO_KEEP,
               async_save: bool = True):
    self.directory = epath.Path(directory).absolute()
    if int(max_to_keep) < 1:
      raise ValueError(f'max_to_keep must be >= 1, found {max_to_keep}.')
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
      IncompatibleCheckpointError: naming the path and the first mismatching
        key when the checkpoint does not fit `target`.
      CorruptCheckpointError: naming the path when it cannot be read.
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
      extras = restored[EXTRAS]
      if extras is not None and not isinstance(extras, Mapping):
        raise ValueError(f'extras are a {type(extras).__name__}, not a dict')
    except Exception as e:  # orbax/TensorStore raise many types.
      cause = e
      while cause is not None:
        if isinstance(cause, IncompatibleCheckpointError):
          raise IncompatibleCheckpointError(str(cause)) from e
        cause = cause.__cause__ or cause.__context__
      raise CorruptCheckpointError(
          f'Checkpoint {path} is unreadable: {_one_line(e)}') from e
    return restored[STATE], dict(extras or {})

  def restore_latest(self, target: Any, data_iterator: Any = None
                     ) -> tuple[Any, dict[str, Any]] | None:
    """`restore` of the newest intact checkpoint; None if there is none.

    A damaged checkpoint is named in a warning, moved to
    `<directory>.corrupt/<step>-<time>` and the next older one is tried
    (every process takes the same decision).

    Raises:
      IncompatibleCheckpointError: the newest readable checkpoint does not
        fit `target` (config changed).
      CorruptCheckpointError: checkpoints exist but none is intact; the
        message names each one tried and why it failed.
    """
    tried = []
    for step in sorted(self.all_steps(), reverse=True):
      logging.info('Restoring checkpoint %s/%d', self.directory, step)
      error = None
      try:
        out = self.restore(step, target, data_iterator)
      except CorruptCheckpointError as e:
        error = e
      if _all_processes_agree(error is None):
        if tried:
          logging.warning('Resumed from checkpoint %s/%d, the newest intact '
                          'one.', self.directory, step)
        return out
      reason = str(error) if error is not None else (
          f'Checkpoint {self.directory / str(step)} is unreadable on another '
          'process')
      tried.append(reason)
      moved = self._quarantine(step)
      logging.warning('%s; moved it to %s and falling back to an older '
                      'checkpoint.', reason, moved)
    if tried:
      raise CorruptCheckpointError(
          f'No intact checkpoint in {self.directory}; tried (newest first): '
          + ' | '.join(tried) + '. The damaged folders were moved to '
          f'{self.directory}{CORRUPT_SUFFIX}/. Use a fresh --workdir, or '
          'restore a checkpoint folder from a backup.')
    return None

  def _quarantine(self, step: int) -> str:
    """Moves checkpoint `step` aside (process 0) so a new one can be saved."""
    target = epath.Path(f'{self.directory}{CORRUPT_SUFFIX}') / (
        f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint quarantine {step}')
    self._manager.reload()
    return os.fspath(target)

  def _check_compatible(self, step: int, path: epath.Path,
                        abstract: Any) -> None:
    try:
      meta = self.item_metadata(step)
    except Exception as e:
      raise CorruptCheckpointError(
          f'Checkpoint {path} is unreadable: its metadata cannot be read '
          f'({_one_line(e)})') from e
    if meta is None:
      return
    saved = _signatures(meta)
    wanted = _signatures(abstract)
    fix = 'Use a fresh --workdir or the config that wrote it.'
    # Target order (step, params, opt_state...): the first key named is the
    # most telling one.
    for key in list(wanted) + [k for k in saved if k not in wanted]:
      if key not in saved:
        raise IncompatibleCheckpointError(
            f'Checkpoint {path} has no entry {key!r} that this run expects '
            f'(model/optimiser config changed?). {fix}')
      if key not in wanted:
        raise IncompatibleCheckpointError(
            f'Checkpoint {path} has entry {key!r} that this run does not '
            f'expect (model/optimiser config changed?). {fix}')
      (s_shape, s_dtype), (w_shape, w_dtype) = saved[key], wanted[key]
      if s_shape != w_shape:
        raise IncompatibleCheckpointError(
            f'Checkpoint {path}: {key!r} has shape {s_shape} but this run '
            f'expects {w_shape}. {fix}')
      if s_dtype and w_dtype and s_dtype != w_dtype:
        raise IncompatibleCheckpointError(
            f'Checkpoint {path}: {key!r} has dtype {s_dtype} but this run '
            f'expects {w_dtype}. {fix}')

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
