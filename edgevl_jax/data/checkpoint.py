"""Saving and restoring a loader iterator so a resumed run replays exactly.

A grain `DataLoaderIterator` serialises its position (per-process JSON
bytes) with `get_state()` and resumes with `set_state(state)`. With orbax,
register grain's handler next to the train state:

  mngr = ocp.CheckpointManager(workdir, item_names=('state', 'data'))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=grain.checkpoint.CheckpointSave(data_iterator)))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))

`grain.checkpoint.CheckpointHandler` writes one file per JAX process
(`process_{i}-of-{n}.json`), so each host restores its own shard position.
The helpers below do the same without orbax for simple scripts.
"""
import os

import grain


def save_iterator_state(iterator: grain.DataLoaderIterator,
                        path: str) -> None:
  """Writes the iterator's state to `path` atomically (tmp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(iterator.get_state())
  os.replace(tmp, path)


def restore_iterator_state(iterator: grain.DataLoaderIterator,
                           path: str) -> grain.DataLoaderIterator:
  """Moves a fresh iterator of the same loader to the state saved at path."""
  if not os.path.exists(path):
    raise ValueError(f"No data-iterator state at {path!r}; expected a file "
                     "written by save_iterator_state.")
  with open(path, "rb") as f:
    iterator.set_state(f.read())
  return iterator
