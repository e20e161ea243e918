"""Run outputs: metrics.jsonl, TensorBoard events, progress bar, report.

Only process 0 writes files. `metrics.jsonl` gets one JSON object per line,
always with `step`; after a resume, steps between the last checkpoint and
the crash appear twice (readers keep the last line per step, as `read_jsonl`
does with `dedupe=True`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
import tensorboardX
import tqdm

from edgevl_jax.utils import io

METRICS_FILE = 'metrics.jsonl'
REPORT_FILE = 'report.json'


def is_main_process() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def jsonable(value: Any) -> Any:
  """Host scalars/arrays -> JSON values (NaN/Inf kept as strings)."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if hasattr(value, 'shape') or isinstance(value, (np.generic,)):
    arr = np.asarray(value)
    if arr.ndim == 0:
      value = arr.item()
    else:
      return jsonable(arr.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Writes scalars to DIR/metrics.jsonl, DIR/tb and a tqdm progress bar.

  Args:
    workdir: the run's folder (created).
    total_steps: length of the progress bar (None: no bar).
    initial_step: where the bar starts (the restored step on resume).
    tensorboard: also write TensorBoard event files under DIR/tb.
    progress: show the tqdm bar (rate and ETA) on process 0.
  """

  def __init__(self, workdir: str | os.PathLike, *,
               total_steps: int | None = None, initial_step: int = 0,
               tensorboard: bool = True, progress: bool = True):
    self.workdir = os.fspath(workdir)
    self._main = is_main_process()
    self._tb = None
    self._bar = None
    if not self._main:
      return
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, METRICS_FILE)
    repair_torn_jsonl(path)
    self._file = open(path, 'a')
    if tensorboard:
      self._tb = tensorboardX.SummaryWriter(os.path.join(self.workdir, 'tb'))
    if progress and total_steps:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                            dynamic_ncols=True, desc='train', leave=True)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {'step': step, **metrics} (host values) and logs to TB."""
    if not self._main:
      return
    record = {'step': int(step), **jsonable(dict(metrics))}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(
            value, bool):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def progress(self, step: int, postfix: Mapping[str, Any] | None = None
               ) -> None:
    """Moves the progress bar to `step` (optionally showing a few values)."""
    if self._bar is None:
      return
    self._bar.update(max(0, int(step) - self._bar.n))
    if postfix:
      self._bar.set_postfix({k: f'{float(v):.4g}' for k, v in postfix.items()},
                            refresh=False)

  def close(self) -> None:
    if not self._main:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def repair_torn_jsonl(path: str | os.PathLike) -> int:
  """Cuts a partial last line (a write cut by a crash) off a JSONL file.

  Returns:
    The number of bytes removed (0 when the file ends with a newline or
    does not exist).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path, 'rb+') as f:
    data = f.read()
    if not data or data.endswith(b'\n'):
      return 0
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  removed = len(data) - keep
  logging.warning('%s ended in a partial line (%d bytes, a write cut by a '
                  'crash); removed it before appending.', path, removed)
  return removed


def write_report(workdir: str | os.PathLike, report: Mapping[str, Any]
                 ) -> str:
  """Atomically writes DIR/report.json (process 0); returns its path."""
  path = os.path.join(os.fspath(workdir), REPORT_FILE)
  if is_main_process():
    io.atomic_write_json(path, jsonable(dict(report)))
  return path


def read_report(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """DIR/report.json as a dict, or None if the run has not finished."""
  path = os.path.join(os.fspath(workdir), REPORT_FILE)
  if not os.path.exists(path):
    return None
  return io.read_json(path, fix='delete it to re-run that step')


def read_jsonl(path: str | os.PathLike, dedupe: bool = True
               ) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl; with `dedupe`, the last record per step and
  set of keys wins (a resumed run rewrites the steps after its checkpoint)."""
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: a torn last write
        logging.warning('%s: ignoring the partial last line %d.', path,
                        number)
        continue
      raise ValueError(
          f'{path}, line {number}, is not JSON ({e.msg}); repair or delete '
          'that line (each line must be one JSON object).') from e
  if not dedupe:
    return records
  last = {}
  for r in records:
    last[(r.get('step'), tuple(sorted(r)))] = r
  return sorted(last.values(), key=lambda r: r.get('step', 0))


# Report keys with these suffixes hold paths relative to the report's folder.
PATH_KEY_SUFFIXES = ('_path', '_dir', '_dirs')


def rebase_paths(report: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Copy of `report` with relative path values prefixed by `prefix`.

  Turns paths relative to a stage folder into paths relative to the folder
  above it (e.g. 'teacher' -> '0_clip_pretrain/teacher').
  """
  out = {}
  for key, value in report.items():
    if isinstance(value, Mapping):
      value = rebase_paths(value, prefix)
    elif key.endswith(PATH_KEY_SUFFIXES):
      value = ([_rebase(v, prefix) for v in value]
               if isinstance(value, list) else _rebase(value, prefix))
    out[key] = value
  return out


def _rebase(value: Any, prefix: str) -> Any:
  if (isinstance(value, str) and not os.path.isabs(value)
      and '://' not in value):
    return os.path.normpath(os.path.join(prefix, value))
  return value
