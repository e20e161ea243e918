"""The workdir: one run at a time, bad folders named, configs recorded right."""
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax import main as main_lib  # noqa: E402
from edgevl_jax.run import lock as workdir_lock  # noqa: E402
from tests import toy_trainer  # noqa: E402

ENV = {**os.environ, 'PYTHONPATH': str(ROOT)}


def _main(workdir, *flags, config='tests/toy_trainer.py:steps=20'):
  return subprocess.run(
      [sys.executable, '-m', 'edgevl_jax.main', f'--config={config}',
       f'--workdir={workdir}', *flags], cwd=ROOT, env=ENV,
      capture_output=True, text=True, timeout=300)


_HOLDER = """
import sys, time
from edgevl_jax.run import lock as workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
"""


def _hold(workdir):
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)],
                          cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_second_run_on_a_live_workdir_stops_naming_the_holder(tmp_path):
  workdir = tmp_path / 'wd'
  holder = _hold(workdir)
  try:
    run = _main(workdir)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f'FATAL --workdir={workdir} is in use by a '
                              f'live run (pid {holder.pid} on host ')
    assert 'pass another --workdir' in message
    assert not (workdir / 'config.json').exists()
  finally:
    holder.kill()
    holder.wait()
  # The killed holder's lock file is still there, but the lock died with it.
  assert (workdir / workdir_lock.LOCK_FILE).exists()
  run = _main(workdir)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads((workdir / 'report.json').read_text())['steps'] == 20


def test_workdir_that_is_a_file_is_named_in_one_line(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('x')
  run = _main(path)
  assert run.returncode != 0
  assert (f'--workdir={path} exists and is not a directory'
          in run.stderr.strip().splitlines()[-1])


def test_read_only_workdir_is_named(tmp_path, monkeypatch):
  folder = tmp_path / 'read_only'
  folder.mkdir()
  os.chmod(folder, 0o555)
  if os.geteuid() == 0:
    # Root writes anywhere; answer os.access as any other user would.
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: real_access(p, mode) and
                        not (mode & os.W_OK and not os.stat(p).st_mode & 0o200))
  try:
    with pytest.raises(ValueError) as error:
      workdir_lock.check_writable(str(folder / 'wd'))
    with pytest.raises(ValueError, match='the workdir is not writable'):
      workdir_lock.check_writable(str(folder))
  finally:
    os.chmod(folder, 0o755)
  assert str(error.value) == (
      f'--workdir={folder}/wd: the parent folder {folder} is not writable by '
      'this user; pick a writable folder or fix its permissions.')


@pytest.mark.parametrize('flag,first_line', [
    ('--config.num_steps=abc',
     "flag --config.num_steps=abc: invalid literal for int() with base 10: "
     "'abc'"),
    ('--config.optim.lr=fast',
     "flag --config.optim.lr=fast: could not convert string to float: "
     "'fast'")])
def test_flag_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, flag,
                                                           first_line):
  run = _main(tmp_path / 'wd', flag)
  assert run.returncode != 0
  lines = run.stderr.strip().splitlines()
  assert lines == [f'FATAL Flags parsing error: {first_line} (the value does '
                   'not have the type of that config key).']


def test_a_failed_run_does_not_record_its_bad_config(tmp_path):
  workdir = tmp_path / 'wd'
  bad = toy_trainer.get_config('steps=4')
  bad.optim.name = 'rmsprop'
  with pytest.raises(app.UsageError, match='optim.name'):
    main_lib.run(bad, str(workdir))
  assert not (workdir / 'config.json').exists()
  good = toy_trainer.get_config('steps=4')
  assert main_lib.run(good, str(workdir))['steps'] == 4
  assert json.loads((workdir / 'config.json').read_text())['optim'][
      'name'] == 'adamw'


def _toy_stage(name, steps, **keys):
  c = toy_trainer.get_config(f'steps={steps}')
  c.log_every, c.ckpt_every = 2, 2
  c = ml_collections.ConfigDict({**c.to_dict(), 'name': name, **keys})
  return c


def _three_stages(second_hidden=32):
  return ml_collections.ConfigDict({'trainer': 'pipeline', 'stages': [
      _toy_stage('first', 4),
      _toy_stage('second', 4, hidden=second_hidden),
      _toy_stage('third', 4, seed='@first/steps'),
      _toy_stage('fourth', 4, seed='@second/steps')]})


def test_warn_reruns_changed_stages_and_their_dependents(tmp_path):
  workdir = str(tmp_path / 'wd')
  main_lib.run(_three_stages(), workdir)
  first_log = (tmp_path / 'wd' / '0_first' / 'metrics.jsonl').read_text()
  changed = _three_stages(second_hidden=16)
  with pytest.raises(app.UsageError, match=r"differs in \['stages.1.hidden'"):
    main_lib.run(changed, workdir)
  report = main_lib.run(changed, workdir, on_config_change='warn')
  wd = tmp_path / 'wd'
  # first and third (which uses only first) are kept; second and fourth
  # (which uses second) are redone; their old folders are kept aside.
  assert (wd / '0_first' / 'metrics.jsonl').read_text() == first_log
  stale = sorted(p.name.split('.stale-')[0] for p in wd.iterdir()
                 if '.stale-' in p.name)
  assert stale == ['1_second', '3_fourth']
  for stage in ('1_second', '3_fourth'):
    recorded = json.loads((wd / stage / 'config.json').read_text())
    assert recorded['hidden'] == (16 if stage == '1_second' else 32)
  skipped = {r['stage']: r['skipped'] for r in
             map(json.loads, (wd / 'metrics.jsonl').read_text().splitlines())}
  assert skipped == {'first': True, 'second': False, 'third': True,
                     'fourth': False}
  assert json.loads((wd / 'config.json').read_text())['stages'][1][
      'hidden'] == 16
  assert report['stages']['second']['steps'] == 4


def test_pipeline_validates_every_stage_before_the_first_runs(tmp_path):
  config = _three_stages()
  config.stages[3].optim.lr = -1.0
  with pytest.raises(app.UsageError,
                     match=r'stages\[3\] \(fourth\): config\.optim\.lr'):
    main_lib.run(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()
