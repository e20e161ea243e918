"""One run per workdir: an advisory lock held for the whole run.

    with workdir_lock.hold(workdir):
      ...  # the run

Process 0 takes an exclusive `flock` on WORKDIR/.lock and writes who holds
it (pid, host, start time, command line) into the file. The kernel drops the
lock when the holder dies, however it dies, so a lock left by a killed run
never blocks the re-run; the holder record is only there to name a LIVE
holder in the message. A multi-process run takes one lock (process 0's) and
every process learns the outcome, so all stop together when the workdir is
taken. Object-store workdirs (gs://...) cannot be locked; a warning says so.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_FILE = '.lock'


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def check_writable(workdir: str) -> None:
  """ValueError in one line when `workdir` cannot hold a run's files."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} exists and is not a directory; '
                     'pass a folder path.')
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or '.'
  if not os.access(parent, os.W_OK | os.X_OK):
    what = 'workdir' if parent == workdir else f'parent folder {parent}'
    raise ValueError(f'--workdir={workdir}: the {what} is not writable by '
                     'this user; pick a writable folder or fix its '
                     'permissions.')


def _holder_record() -> dict[str, object]:
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': ' '.join(sys.argv)[:500]}


def _describe(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command')}")
  except (OSError, ValueError):
    return 'holder unknown (lock file unreadable)'


def _try_lock(workdir: str) -> tuple[int | None, str]:
  """(fd, '') when locked here, (None, message) when a live run holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    return None, (
        f'--workdir={workdir} is in use by a live run ({_describe(path)}). '
        'Wait for it to finish, stop it (it checkpoints on SIGTERM: kill '
        'PID), or pass another --workdir.')
  os.ftruncate(fd, 0)
  os.write(fd, (json.dumps(_holder_record()) + '\n').encode())
  os.fsync(fd)
  return fd, ''


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the block.

  Raises:
    WorkdirBusyError: naming the live holder (pid, host, command) and what
      to do, on every process of the run.
  """
  if '://' in workdir:
    logging.warning('%s is not a local path: it cannot be locked, so make '
                    'sure no other run uses it.', workdir)
    yield
    return
  fd, message = (None, '')
  if jax.process_index() == 0:
    fd, message = _try_lock(workdir)
  ok = fd is not None or jax.process_index() != 0
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if not ok:
    raise WorkdirBusyError(message or f'--workdir={workdir} is in use by '
                           'another live run (see process 0\'s message).')
  try:
    yield
  finally:
    if fd is not None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
