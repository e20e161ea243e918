"""Resumption and multi-process runs through the CLI (subprocesses)."""
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from edgevl_jax.run import metrics as metrics_lib  # noqa: E402
from tests import toy_trainer  # noqa: E402


def _main(workdir, *flags, env=None):
  env = {**os.environ, 'PYTHONPATH': str(ROOT),
         # The same matmul precision as this (conftest-configured) process.
         'JAX_DEFAULT_MATMUL_PRECISION': 'highest', **(env or {})}
  return subprocess.run(
      [sys.executable, '-m', 'edgevl_jax.main',
       '--config=tests/toy_trainer.py:steps=60', f'--workdir={workdir}',
       *flags], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  killed = tmp_path / 'killed'
  run = _main(killed, env={'TOY_SIGKILL_AT_STEP': '37'})
  assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
  with checkpoint_lib.Checkpointer(killed / 'checkpoints') as ckpt:
    assert ckpt.latest_step() in (20, 30)  # 30 unless its async save was cut
  assert not (killed / 'report.json').exists()

  run = _main(killed)
  assert run.returncode == 0, run.stderr[-2000:]
  assert metrics_lib.read_report(killed)['steps'] == 60

  # The uninterrupted reference, in this process.
  reference = tmp_path / 'reference'
  config = toy_trainer.get_config('steps=60')
  report = toy_trainer.train_and_evaluate(config, str(reference))

  resumed_params = checkpoint_lib.load_params(killed)
  reference_params = checkpoint_lib.load_params(reference)
  leaves = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(a, b)), resumed_params,
      reference_params))
  assert leaves and all(leaves)
  assert metrics_lib.read_report(killed)['final_loss'] == report['final_loss']
  # The logged curves agree too (the resumed run rewrites steps 31..37).
  def curve(d):
    return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(
        d / 'metrics.jsonl')}
  assert curve(killed) == curve(reference)


@pytest.mark.slow
def test_two_process_run_matches_one_process(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
         'JAX_DEFAULT_MATMUL_PRECISION': 'highest',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  workdir = tmp_path / 'two'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'edgevl_jax.main',
       '--config=tests/toy_trainer.py:steps=20', f'--workdir={workdir}',
       f'--coordinator_address=localhost:{port}', '--num_processes=2',
       f'--process_id={i}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  # Each process saved its own data-iterator position.
  assert sorted(os.listdir(workdir / 'checkpoints' / '20' / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  reference = tmp_path / 'one'
  toy_trainer.train_and_evaluate(toy_trainer.get_config('steps=20'),
                                 str(reference))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               checkpoint_lib.load_params(workdir),
               checkpoint_lib.load_params(reference))
