"""Checkpoints survive what real runs meet: typed keys, damage, torn logs."""
import glob
import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from edgevl_jax.run import metrics as metrics_lib  # noqa: E402
from tests import toy_trainer  # noqa: E402


def _state(seed, impl='threefry2x32'):
  return {'step': jnp.asarray(seed, jnp.int32),
          'rng': jax.random.key(seed, impl=impl),
          'keys': jax.random.split(jax.random.key(seed + 1), 3),
          'w': jnp.arange(20000, dtype=jnp.float32) * seed}


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_typed_keys_round_trip_exactly(tmp_path, impl):
  state = _state(7, impl)
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(state, step=1)
  fresh = _state(0, impl)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore_latest(fresh)
  for key in ('rng', 'keys'):
    assert restored[key].dtype == state[key].dtype
    np.testing.assert_array_equal(jax.random.key_data(restored[key]),
                                  jax.random.key_data(state[key]))
  np.testing.assert_array_equal(restored['w'], state['w'])
  # The restored key draws the numbers the saved one draws.
  np.testing.assert_array_equal(
      jax.random.normal(restored['rng'], (4,)),
      jax.random.normal(state['rng'], (4,)))


def test_other_key_impl_or_dtype_is_incompatible_not_corrupt(tmp_path):
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(_state(1), step=1)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                       match="'rng' has shape \\(2,\\) but this run expects "
                       "\\(4,\\)"):
      ckpt.restore_latest(_state(0, 'rbg'))
    bf16 = {**_state(0), 'w': _state(0)['w'].astype(jnp.bfloat16)}
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                       match="'w' has dtype float32 but this run expects "
                       'bfloat16'):
      ckpt.restore_latest(bf16)
    assert ckpt.all_steps() == [1]  # nothing moved aside


def _truncate_array_file(step_dir):
  files = glob.glob(f'{step_dir}/state/ocdbt.process_0/d/*')
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)


def _remove_manifest(step_dir):
  os.remove(f'{step_dir}/state/manifest.ocdbt')


def _garble_extras(step_dir):
  for f in glob.glob(f'{step_dir}/extras/*'):
    if 'commit' not in f:
      pathlib.Path(f).write_text('{"summary": ')


def _garble_iterator(step_dir):
  pathlib.Path(f'{step_dir}/data/process_0-of-1.json').write_text('{kind')


def _remove_iterator(step_dir):
  os.remove(f'{step_dir}/data/process_0-of-1.json')


DAMAGE = {'truncated array file': _truncate_array_file,
          'missing manifest': _remove_manifest,
          'garbled extras': _garble_extras,
          'garbled iterator state': _garble_iterator,
          'missing iterator state': _remove_iterator}


def _two_checkpoints(directory):
  stream = toy_trainer.NumpyStream(0, 4)
  with checkpoint_lib.Checkpointer(directory, async_save=False) as ckpt:
    for step in (1, 2):
      next(stream)
      ckpt.save(_state(step), step=step, data_iterator=stream,
                extras={'summary': {'loss': float(step)}})


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_older(tmp_path, caplog,
                                                       damage):
  directory = tmp_path / 'checkpoints'
  _two_checkpoints(directory)
  DAMAGE[damage](directory / '2')
  stream = toy_trainer.NumpyStream(0, 4)
  with caplog.at_level(logging.WARNING):
    with checkpoint_lib.Checkpointer(directory) as ckpt:
      restored, extras = ckpt.restore_latest(_state(0), stream)
      assert ckpt.all_steps() == [1]
      # The run goes on and writes a good step 2 again.
      ckpt.save(restored, step=2, data_iterator=stream)
      ckpt.wait()
      assert ckpt.all_steps() == [1, 2]
  assert int(restored['step']) == 1 and stream.index == 1
  assert extras == {'summary': {'loss': 1.0}}
  np.testing.assert_array_equal(restored['w'], _state(1)['w'])
  warned = ' '.join(r.getMessage() for r in caplog.records)
  assert f'Checkpoint {directory}/2 is unreadable' in warned
  assert 'falling back' in warned
  moved = os.listdir(f'{directory}.corrupt')
  assert len(moved) == 1 and moved[0].startswith('2-')


def test_no_intact_checkpoint_names_every_one_tried(tmp_path):
  directory = tmp_path / 'checkpoints'
  _two_checkpoints(directory)
  _truncate_array_file(directory / '2')
  _garble_extras(directory / '1')
  with checkpoint_lib.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint_lib.CorruptCheckpointError) as error:
      ckpt.restore_latest(_state(0), toy_trainer.NumpyStream(0, 4))
  message = str(error.value)
  assert message.startswith(f'No intact checkpoint in {directory}')
  assert f'{directory}/2 is unreadable' in message
  assert f'{directory}/1 is unreadable' in message
  assert len(message) < 1500  # one readable line, not TensorStore specs


def test_default_keeps_two_checkpoints(tmp_path):
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(_state(step), step=step)
    assert ckpt.all_steps() == [2, 3]


def test_torn_metrics_line_is_repaired_before_appending(tmp_path, caplog):
  path = tmp_path / metrics_lib.METRICS_FILE
  path.write_text(json.dumps({'step': 1, 'loss': 0.5}) + '\n{"step": 2, "lo')
  with caplog.at_level(logging.WARNING):
    assert [r['step'] for r in metrics_lib.read_jsonl(path)] == [1]
    with metrics_lib.MetricWriter(tmp_path, tensorboard=False,
                                  progress=False) as writer:
      writer.write(2, {'loss': 0.25})
  assert [r['loss'] for r in metrics_lib.read_jsonl(path)] == [0.5, 0.25]
  assert 'partial line' in caplog.text
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=f'{path}, line 2, is not JSON'):
    metrics_lib.read_jsonl(path)
