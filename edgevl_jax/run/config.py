"""Configs: one schema per job, big_vision-style `get_config(arg)` parsing.

A job module declares every key it reads, with its default and a one-line
description, in `defaults() -> Schema` (`field(default, doc)`); RUN_DEFAULTS
adds the keys every run has (seed, mesh, cadence, checkpoints, display).
`run.registry` merges the two under a config, refuses keys that neither
declares, and locks the result, so a job body reads `config.key` and a
misspelt key fails before any compute instead of quietly taking a default.

A config file exposes `get_config(arg=None)`; the string after the colon in
`--config=configs/demo.py:quick,student=vit_s16` selects a variant. Use
`parse_arg` to turn it into typed values, and `require` in a job's
`validate(config)` for cross-key checks, so a bad value stops the run before
any compute with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Mapping

import ml_collections


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: its default, what it means, and its type when None.

  Attributes:
    default: the value when the config does not set it (a dict default is a
      free-form mapping whose keys the job checks itself, e.g. model
      overrides).
    doc: one line for `--describe` and the job's docstring.
    type: the value type when `default` is None (so the key can still be
      set from the command line), e.g. int.
  """
  default: Any
  doc: str
  type: type | None = None


def field(default: Any, doc: str, type: type | None = None) -> Field:  # pylint: disable=redefined-builtin
  return Field(default, doc, type)


# A schema maps key -> Field, or key -> a nested schema (e.g. optim).
Schema = dict


def _field_value(f: Field) -> Any:
  if f.default is None:
    return ml_collections.config_dict.placeholder(f.type or str)
  if isinstance(f.default, Mapping):
    return ml_collections.ConfigDict(dict(f.default))
  if isinstance(f.default, list):
    return tuple(f.default)
  return f.default


def schema_config(schema: Schema) -> ml_collections.ConfigDict:
  """The ConfigDict of a schema's defaults (unlocked)."""
  out = ml_collections.ConfigDict()
  for key, value in schema.items():
    out[key] = (schema_config(value) if isinstance(value, dict)
                else _field_value(value))
  return out


def describe(schema: Schema, prefix: str = '') -> list[str]:
  """'key = default  # doc' lines of a schema, nested keys dotted."""
  lines = []
  for key, value in schema.items():
    if isinstance(value, dict):
      lines += describe(value, f'{prefix}{key}.')
    else:
      lines.append(f'{prefix}{key} = {value.default!r}  # {value.doc}')
  return lines


def build(schema: Schema, values: Any, *, where: str = 'config'
          ) -> ml_collections.ConfigDict:
  """The schema's defaults overlaid with `values` (a dict or ConfigDict).

  FieldReferences among the values are kept (a pipeline shares its seed and
  data keys with every stage through them). Types follow the defaults (an
  int is accepted for a float, a list for a tuple).

  Raises:
    ValueError: naming the first key the schema does not declare (and the
      keys it does), or a value of the wrong type.
  """
  out = schema_config(schema)
  if values is None:
    return out
  if isinstance(values, ml_collections.ConfigDict):
    items = values.items(preserve_field_references=True)
  else:
    items = dict(values).items()
  for key, value in items:
    if key not in schema:
      raise ValueError(
          f'{where}.{key} is not a key of this job; known keys: '
          f'{sorted(schema)}. (Misspelt? `python -m edgevl_jax.main '
          '--describe=JOB` lists them.)')
    spec = schema[key]
    if isinstance(spec, dict):
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f'{where}.{key} must be a mapping of keys '
                         f'{sorted(spec)}, found {value!r}.')
      out[key] = build(spec, value, where=f'{where}.{key}')
      continue
    if isinstance(spec.default, Mapping):
      value = ml_collections.ConfigDict(to_dict(value) or {})
    elif isinstance(spec.default, tuple) and isinstance(value, list):
      value = tuple(value)
    elif isinstance(spec.default, float) and type(value) is int:  # pylint: disable=unidiomatic-typecheck
      value = float(value)
    if is_reference(value):
      # '@stage/key': resolved (and type-checked) when the stage runs.
      del out[key]
    try:
      out[key] = value
    except TypeError as e:
      raise ValueError(f'{where}.{key}={value!r}: {e}') from e
  return out


# Keys every run has, whatever the job (their defaults, and what they mean).
RUN_DEFAULTS: Schema = {
    'seed': field(0, 'base seed: initialisation, data order, augmentation'),
    'mesh': field({'data': -1, 'fsdp': 1},
                  'device mesh axis sizes (-1: the remaining devices)'),
    'log_every': field(50, 'steps between logged means of the metrics'),
    'ckpt_every': field(0, 'steps between checkpoints (0: only time-based, '
                        'at the end and on preemption)'),
    'ckpt_every_minutes': field(15.0, 'minutes between checkpoints (0: '
                                'off); bounds the work an OOM kill or a lost '
                                'node costs'),
    'eval_every': field(0, 'steps between evaluations (0: once per epoch '
                        'where the job knows its epoch, else at the end)'),
    'max_to_keep': field(2, 'checkpoints kept (2: a damaged newest one has a '
                         'fallback)'),
    'tensorboard': field(True, 'write TensorBoard events under WORKDIR/tb'),
    'progress': field(True, 'show a progress bar with rate and ETA'),
    'eval_batch_size': field(256, 'batch size of evaluation passes'),
}
# Run keys that may change between a run and its resumption.
RESUME_SAFE_KEYS = ('log_every', 'ckpt_every', 'ckpt_every_minutes',
                    'eval_every', 'progress', 'max_to_keep', 'tensorboard',
                    'eval_batch_size')


def _coerce(name: str, text: str, default: Any) -> Any:
  """Parses `text` to the type of `default` (bool/int/float/str/None)."""
  if isinstance(default, bool):
    low = text.lower()
    if low in ('1', 'true', 'yes', 'y', ''):
      return True
    if low in ('0', 'false', 'no', 'n'):
      return False
    raise ValueError(f'config arg {name!r}: expected a bool, found {text!r}.')
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(
          f'config arg {name!r}: expected an int, found {text!r}.') from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(
          f'config arg {name!r}: expected a float, found {text!r}.') from None
  return text


def parse_arg(arg: str | None, *, lazy: bool = False,
              **spec: Any) -> ml_collections.ConfigDict:
  """Parses a big_vision-style config argument string.

  `parse_arg('quick,student=vit_s16', quick=False, student='vit_t', res=224)`
  -> ConfigDict(quick=True, student='vit_s16', res=224). A bare name means
  True; `name=value` is parsed to the type of the default in `spec`.

  Args:
    arg: the text after ':' in `--config=file.py:ARG` (None or '' = defaults).
    lazy: if True, names missing from `spec` are accepted as strings (or True
      when bare); otherwise they raise ValueError listing the known names.
    **spec: known argument names and their defaults (the defaults set types).

  Returns:
    An unlocked ConfigDict with every name of `spec` plus the given ones.
  """
  out = dict(spec)
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    name, sep, value = item.partition('=')
    name = name.strip()
    if name not in spec and not lazy:
      raise ValueError(
          f'Unknown config arg {name!r} in {arg!r}; known args: '
          f'{sorted(spec)}.')
    if name in spec:
      out[name] = _coerce(name, value.strip() if sep else '', spec[name])
    else:
      out[name] = value.strip() if sep else True
  return ml_collections.ConfigDict(out)


def get(config: Any, key: str, default: Any = None) -> Any:
  """Reads a dotted key (`'optim.lr'`) from a ConfigDict or dict."""
  node = config
  for part in key.split('.'):
    if isinstance(node, Mapping) or hasattr(node, 'keys'):
      if part not in node:
        return default
      node = node[part]
    else:
      return default
  return node


_MISSING = object()


def is_reference(value: Any) -> bool:
  """Whether `value` is a pipeline reference ('@stage/key'), resolved later.

  Validators skip the checks that need the referenced value (a folder's
  contents, a report number) and check it once the pipeline resolves it.
  """
  return isinstance(value, str) and value.startswith('@') and '/' in value


def require(config: Any, key: str, *, allowed: Iterable[Any] | None = None,
            types: type | tuple[type, ...] | None = None,
            check: Callable[[Any], bool] | None = None,
            expected: str | None = None) -> Any:
  """Checks a config value and returns it; raises ValueError naming the key.

  Args:
    config: a ConfigDict (or nested dicts).
    key: dotted key, e.g. `'optim.name'`.
    allowed: if given, the value must be one of these.
    types: if given, the value must be an instance of these types (an int is
      accepted where float is asked for; bool is never an int here).
    check: if given, a predicate the value must satisfy
      (e.g. `lambda v: v > 0`).
    expected: words describing what `check` wants, used in the message.

  Returns:
    The value at `key`.
  """
  value = get(config, key, _MISSING)
  if value is _MISSING:
    raise ValueError(f'config.{key} is missing; set it in the config file or '
                     f'with --config.{key}=VALUE.')
  if types is not None:
    tys = types if isinstance(types, tuple) else (types,)
    if float in tys and int not in tys:
      tys = tys + (int,)
    ok = isinstance(value, tys) and not (
        isinstance(value, bool) and bool not in tys)
    if not ok:
      names = '/'.join(t.__name__ for t in tys)
      raise ValueError(f'config.{key} must be of type {names}, found '
                       f'{value!r} ({type(value).__name__}).')
  if allowed is not None:
    allowed = tuple(allowed)
    if value not in allowed:
      raise ValueError(f'config.{key} must be one of {list(allowed)}, found '
                       f'{value!r}.')
  if check is not None and not check(value):
    raise ValueError(f'config.{key} must be {expected or "valid"}, found '
                     f'{value!r}.')
  return value


def require_positive(config: Any, key: str, *, integer: bool = False) -> Any:
  """`require` for a number > 0 (an int if `integer`)."""
  return require(config, key, types=int if integer else float,
                 check=lambda v: v > 0,
                 expected='a positive ' + ('int' if integer else 'number'))


def to_dict(config: Any) -> Any:
  """A JSON-able plain copy of a ConfigDict (tuples become lists)."""
  if isinstance(config, ml_collections.FieldReference):
    config = config.get()
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {str(k): to_dict(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  if isinstance(config, (str, int, float, bool)) or config is None:
    return config
  return repr(config)


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """Flattens nested dicts/lists to {'a.b.0.c': leaf}."""
  out = {}
  if isinstance(tree, Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(tree))
  else:
    return {prefix: tree}
  for k, v in items:
    out.update(flatten(v, f'{prefix}.{k}' if prefix else str(k)))
  if not out and prefix:
    out[prefix] = tree
  return out


def diff_keys(old: Any, new: Any, *, ignore_added: bool = False) -> list[str]:
  """Dotted keys whose values differ between two configs (or JSON dicts).

  With `ignore_added`, keys that `old` lacks are not reported: a config
  recorded before a key existed (an earlier layout) then still matches.
  """
  a, b = flatten(to_dict(old)), flatten(to_dict(new))
  keys = set(a) | (set() if ignore_added else set(b))
  return sorted(k for k in keys
                if json.dumps(a.get(k, '<missing>'), sort_keys=True)
                != json.dumps(b.get(k, '<missing>'), sort_keys=True))
