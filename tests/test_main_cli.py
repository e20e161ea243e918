"""The CLI: locked config, validation before compute, config-change guard."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from absl import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax import main as main_lib  # noqa: E402
from tests import toy_trainer  # noqa: E402


def _main(workdir, *flags, **env_vars):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), **env_vars}
  return subprocess.run(
      [sys.executable, '-m', 'edgevl_jax.main',
       '--config=tests/toy_trainer.py', f'--workdir={workdir}', *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_config_key_fails_naming_it(tmp_path):
  # Through the one-host launcher, which forwards extra flags to main.
  run = subprocess.run(
      ['bash', 'launch/local.sh', 'tests/toy_trainer.py', str(tmp_path / 'wd'),
       '--config.optim.lrr=0.1'], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHON': sys.executable},
      timeout=300)
  assert run.returncode != 0
  assert 'lrr' in run.stderr and 'locked' in run.stderr
  assert not (tmp_path / 'wd').exists()


def test_invalid_value_fails_before_compute_naming_it(tmp_path):
  run = _main(tmp_path / 'wd', '--config.optim.name=rmsprop')
  assert run.returncode != 0
  assert "config.optim.name must be one of ['adamw', 'sgd', 'adam']" in (
      run.stderr)
  assert not (tmp_path / 'wd').exists()


def test_invalid_value_in_process_names_key_and_writes_nothing(tmp_path):
  config = toy_trainer.get_config()
  config.num_steps = -3
  with pytest.raises(app.UsageError, match=r'config\.num_steps must be a '
                     'positive int, found -3'):
    main_lib.run(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()
  config = toy_trainer.get_config()
  config.trainer = 'no_such_trainer'
  with pytest.raises(app.UsageError, match='no_such_trainer'):
    main_lib.run(config, str(tmp_path / 'wd'))


def test_resuming_with_a_changed_config_stops_naming_the_keys(tmp_path):
  config = toy_trainer.get_config()
  (tmp_path / 'config.json').write_text(json.dumps(
      {**config.to_dict(), 'hidden': 64, 'log_every': 1}))
  with pytest.raises(app.UsageError, match=r"differs in \['hidden'\]"):
    main_lib.check_saved_config(str(tmp_path), config.to_dict(), 'error')
  # log_every may change; 'warn' resumes anyway.
  main_lib.check_saved_config(str(tmp_path), config.to_dict(), 'warn')
  same = {**config.to_dict(), 'log_every': 1}
  (tmp_path / 'config.json').write_text(json.dumps(same))
  main_lib.check_saved_config(str(tmp_path), config.to_dict(), 'error')
  assert json.loads((tmp_path / 'config.json').read_text()) == json.loads(
      json.dumps(same))


def test_compilation_cache_defaults_beside_the_workdir(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    folder = main_lib.enable_compilation_cache(None, str(tmp_path / 'runs' /
                                                         'wd'))
    assert folder == str(tmp_path / 'runs' / '.jax_compilation_cache')
    assert jax.config.jax_compilation_cache_dir == folder
    assert main_lib.enable_compilation_cache('none', str(tmp_path)) is None
    other = main_lib.enable_compilation_cache(str(tmp_path / 'c'), 'x')
    assert other == str(tmp_path / 'c')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_a_run_fills_the_compilation_cache(tmp_path):
  run = _main(tmp_path / 'runs' / 'wd',
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  assert run.returncode == 0, run.stderr[-2000:]
  cache = tmp_path / 'runs' / '.jax_compilation_cache'
  assert cache.is_dir() and any(cache.iterdir()), run.stderr[-2000:]
