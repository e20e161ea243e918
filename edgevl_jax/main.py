r"""Entry point of every run.

  python -m edgevl_jax.main --config=FILE.py[:ARG] --workdir=DIR

  --config.KEY=VALUE   overrides (the config is locked: unknown keys fail).
  --workdir            run folder; re-running with it resumes.
  --jax_distributed    'off' (default), 'auto' (jax.distributed.initialize()
                       with no args: TPU pods, SLURM, ... fill them in), or
                       'manual' (uses the three flags below; implied when
                       --coordinator_address is given).
  --coordinator_address, --num_processes, --process_id
  --on_config_change   'error' (default) or 'warn': what to do when DIR has a
                       config.json from an earlier run that differs.
  --describe=JOB       print every config key of a job, its default and
                       meaning, and exit.

`config.trainer` names the job (see `edgevl_jax.run.registry`); its config
is completed with the job's defaults, checked (unknown keys, types, the
job's `validate`) and locked before any compute. Pipeline stages can be
addressed by name: --config.stages.dual_modality_kd.num_steps=100 is
--config.stages[2].num_steps=100 in the demo. The job's report is written
atomically to DIR/report.json.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
# Importing jax does not start its backends, so jax.distributed.initialize()
# in main() still comes first.
import jax
from ml_collections import config_flags

from edgevl_jax.run import checkpoint
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import lock as workdir_lock
from edgevl_jax.run import loop
from edgevl_jax.run import metrics
from edgevl_jax.run import registry
from edgevl_jax.run import runner
from edgevl_jax.utils import io

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (get_config(arg)); FILE.py[:ARG].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (created).')
_JAX_DISTRIBUTED = flags.DEFINE_enum(
    'jax_distributed', 'off', ['off', 'auto', 'manual'],
    'Multi-process initialisation of jax.distributed.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (manual mode).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (manual mode).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process index (manual mode).')
_ON_CONFIG_CHANGE = flags.DEFINE_enum(
    'on_config_change', 'error', ['error', 'warn'],
    'When the workdir holds a different config.json: stop or warn.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    "JAX's persistent compilation cache folder: compiled steps are reused "
    'by later runs and resumptions (default: .jax_compilation_cache beside '
    "the workdir, i.e. in --workdir's parent; 'none' turns it off).")
_DESCRIBE = flags.DEFINE_string(
    'describe', None, 'Print the config keys of this job and exit.')

CONFIG_FILE = 'config.json'


def init_distributed(mode: str, coordinator: str | None,
                     num_processes: int | None, process_id: int | None) -> None:
  """Initialises jax.distributed (before any other JAX call)."""
  if coordinator and mode == 'off':
    mode = 'manual'
  if mode == 'off':
    return
  # Cross-process collectives on the CPU backend need gloo; the setting does
  # not affect GPU/TPU backends, so it is always safe here.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'auto':
    jax.distributed.initialize()
    return
  missing = [n for n, v in (('--coordinator_address', coordinator),
                            ('--num_processes', num_processes),
                            ('--process_id', process_id)) if v is None]
  if missing:
    raise app.UsageError(f'--jax_distributed=manual needs {missing}; or use '
                         '--jax_distributed=auto on TPU pods / SLURM.')
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)


def check_saved_config(workdir: str, config_dict: dict, on_change: str) -> None:
  """Compares with DIR/config.json of an earlier run; stops or warns."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    saved = io.read_json(path, fix='it records the config of an earlier run '
                         'in this workdir: delete it to adopt this run\'s '
                         'config, or use a fresh --workdir')
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  changed = [k for k in config_lib.diff_keys(saved, config_dict, ignore_added=True)
             if k.rsplit('.', 1)[-1] not in config_lib.RESUME_SAFE_KEYS]
  if not changed:
    return
  message = (f'{path} was written by an earlier run whose config differs in '
             f'{changed}. Resuming would mix two experiments.')
  if on_change == 'error':
    raise app.UsageError(message + ' Use a fresh --workdir, or pass '
                         '--on_config_change=warn to resume anyway.')
  logging.warning('%s Resuming anyway (--on_config_change=warn).', message)


def run(config, workdir: str, on_config_change: str = 'error') -> dict:
  """Validates, locks the workdir, records the config, runs the job.

  Nothing is written to the workdir before the config has passed
  validation, so a fixed re-run is never refused as "config differs".
  config.json records the complete config (every default filled in).
  """
  try:
    workdir_lock.check_writable(workdir)
    job, config = registry.validate(config)
  except ValueError as e:
    raise app.UsageError(f'Invalid config: {e}') from e
  config_dict = config_lib.to_dict(config)
  check_saved_config(workdir, config_dict, on_config_change)
  with workdir_lock.hold(workdir):
    if jax.process_index() == 0:
      io.atomic_write_json(os.path.join(workdir, CONFIG_FILE), config_dict)
    logging.info('job %s, workdir %s, %d processes, %d devices',
                 config.trainer, workdir, jax.process_count(),
                 jax.device_count())
    report = runner.execute(job, runner.Context(workdir, config))
    metrics.write_report(workdir, report)
  return report


def describe(job: str) -> str:
  """Every config key of `job` with its default and meaning."""
  return '\n'.join([f'# {job}: config keys (RUN_DEFAULTS + defaults())']
                    + config_lib.describe(registry.schema(job)))


def stage_names_to_indices(argv: list[str]) -> list[str]:
  """--config.stages.NAME.key=v -> --config.stages[i].key=v.

  The stage names come from the config file itself (get_config is cheap and
  has no side effects), so both spellings address the same key.
  """
  if not any(a.startswith('--config.stages.') for a in argv):
    return argv
  spec = next((a.split('=', 1)[1] for a in argv
               if a.startswith('--config=')), None)
  if spec is None:
    return argv
  path, _, arg = spec.partition(':')
  module = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      'stage_names', path)
  config = module.get_config(*([arg] if arg else []))
  names = [s.get('name') for s in config.get('stages', [])]
  out = []
  for a in argv:
    if a.startswith('--config.stages.'):
      name, _, rest = a[len('--config.stages.'):].partition('.')
      if name not in names:
        sys.exit(f'FATAL Flags parsing error: {a.split("=", 1)[0]}: no stage '
                 f'named {name!r}; stages: {names}.')
      a = f'--config.stages[{names.index(name)}].{rest}'
    out.append(a)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; an unknown --config.KEY exits with a one-line error.

  ml_collections raises AttributeError/KeyError (not flags.Error) for a key
  that the locked config does not have, and ValueError/TypeError for a bad
  override path or a get_config(arg) error.
  """
  try:
    if any(a.startswith('--describe') for a in argv):
      flags.FLAGS(argv, known_only=True)
      print(describe(_DESCRIBE.value))
      sys.exit(0)
    argv = stage_names_to_indices(argv)
    # ml_collections reads the --config.* overrides from sys.argv itself.
    sys.argv[1:] = argv[1:]
    return flags.FLAGS(argv)
  except config_flags.config_flags.UnsupportedOperationError as e:
    sys.exit(f'FATAL Flags parsing error: {str(e).split(". Currently")[0]}.')
  except flags.IllegalFlagValueError as e:
    # 'flag --config.seed=abc: invalid literal for int() ...'
    sys.exit(f'FATAL Flags parsing error: {str(e).splitlines()[0]} (the '
             'value does not have the type of that config key).')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]
    detail = str(detail).replace('\n', ' ')
    if isinstance(e, (AttributeError, KeyError)):
      sys.exit(f'FATAL Flags parsing error: unknown config key ({detail}) in '
               f'{bad}. The config is locked: only keys defined by its '
               'get_config() can be overridden.')
    sys.exit(f'FATAL Flags parsing error: {detail} (overrides: {bad}; list '
             'items are written --config.stages[1].key=VALUE).')


def enable_compilation_cache(folder: str | None, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder.

  folder: a path, 'none' (off), or None for WORKDIR/../.jax_compilation_cache
  (shared by the runs of one parent folder). Only compilations that take
  over a second are stored (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
  sets another threshold).
  """
  if folder and folder.lower() == 'none':
    return None
  folder = os.path.abspath(folder or os.path.join(
      os.path.dirname(workdir.rstrip(os.sep)), '.jax_compilation_cache'))
  jax.config.update('jax_compilation_cache_dir', folder)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return folder


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required.')
  py_logging.getLogger('absl').setLevel(py_logging.INFO)
  # orbax logs every step of every save at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or '/orbax/' not in r.pathname)
  init_distributed(_JAX_DISTRIBUTED.value, _COORDINATOR.value,
                   _NUM_PROCESSES.value, _PROCESS_ID.value)
  enable_compilation_cache(_COMPILATION_CACHE.value,
                           os.path.abspath(_WORKDIR.value))
  try:
    run(_CONFIG.value, os.path.abspath(_WORKDIR.value),
        _ON_CONFIG_CHANGE.value)
  except loop.Preempted as e:
    logging.warning('%s', e)
    sys.exit(str(e))
  except (workdir_lock.WorkdirBusyError,
          checkpoint.CorruptCheckpointError,
          checkpoint.IncompatibleCheckpointError) as e:
    sys.exit(f'FATAL {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
