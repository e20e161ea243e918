r"""Runs `edgevl_jax.main` with one injected fault (a real kill of a real run).

  EDGEVL_FAULT=KIND@WHERE[:N] python tests/fault_injection.py --config=... \
      --workdir=DIR [--config.KEY=VALUE ...]

WHERE is a substring of the folder the fault applies to (a stage folder such
as '2_dual_modality_kd', or '' for any). KIND:
  sigterm        after update N of a training loop there, SIGTERM to itself:
                 the run's own preemption handler checkpoints and stops;
  sigkill        after update N, SIGKILL (no chance to save anything);
  sigkill-ckpt   SIGKILL from inside the N-th checkpoint write there (the
                 orbax temporary folder is half written);
  sigkill-report SIGKILL just before that folder's report.json is written
                 (a one-shot stage dies after all its work).
The production code is unchanged: the faults are installed by wrapping
`loop.fit`, the checkpoint extras writer and `metrics.write_report`.
"""
from __future__ import annotations

import os
import signal
import sys

import jax
import orbax.checkpoint as ocp

from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import loop
from edgevl_jax.run import metrics as metrics_lib

KINDS = ('sigterm', 'sigkill', 'sigkill-ckpt', 'sigkill-report')


def parse(spec: str) -> tuple[str, str, int]:
  kind, _, rest = spec.partition('@')
  where, _, n = rest.partition(':')
  if kind not in KINDS:
    raise ValueError(f'EDGEVL_FAULT kind {kind!r} not in {KINDS}')
  return kind, where, int(n or 1)


def _kill(sig: int) -> None:
  sys.stderr.flush()
  os.kill(os.getpid(), sig)


def install(spec: str) -> None:
  """Wraps the run's entry points so that fault `spec` happens."""
  if not spec:
    return
  kind, where, n = parse(spec)

  if kind in ('sigterm', 'sigkill'):
    original_fit = loop.fit
    sig = signal.SIGTERM if kind == 'sigterm' else signal.SIGKILL

    def fit(state, train_step, batches, **kwargs):
      ckpt = kwargs.get('checkpointer')
      if ckpt is None or where not in str(ckpt.directory):
        return original_fit(state, train_step, batches, **kwargs)

      def step(s, b):
        s, metrics = train_step(s, b)
        if int(jax.device_get(s.step)) == n:
          _kill(sig)
        return s, metrics
      return original_fit(state, step, batches, **kwargs)

    loop.fit = fit

  elif kind == 'sigkill-ckpt':
    original_save = checkpoint_lib.Checkpointer.save
    original_save_fn = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
    armed = {'count': 0, 'kill': False}

    def save(self, state, **kwargs):
      if where in str(self.directory):
        armed['count'] += 1
        armed['kill'] = armed['count'] == n
      return original_save(self, state, **kwargs)

    def save_fn(self, item, directory):
      write = original_save_fn(self, item, directory)
      if not armed['kill']:
        return write

      async def killer():
        _kill(signal.SIGKILL)
        return await write
      return killer()

    checkpoint_lib.Checkpointer.save = save
    ocp.JsonCheckpointHandler._save_fn = save_fn  # pylint: disable=protected-access

  else:
    original_write = metrics_lib.write_report

    def write_report(workdir, report):
      if where in os.fspath(workdir):
        _kill(signal.SIGKILL)
      return original_write(workdir, report)

    metrics_lib.write_report = write_report


if __name__ == '__main__':
  install(os.environ.get('EDGEVL_FAULT', ''))
  from absl import app  # pylint: disable=g-import-not-at-top
  from edgevl_jax import main  # pylint: disable=g-import-not-at-top
  app.run(main.main, flags_parser=main.parse_flags)
