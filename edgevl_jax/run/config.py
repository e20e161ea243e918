"""Config helpers: big_vision-style `get_config(arg)` parsing and validation.

A config file exposes `get_config(arg=None)`; the string after the colon in
`--config=configs/demo.py:quick,student=vit_s16` selects a variant. Use
`parse_arg` to turn it into typed values, and `require` in a trainer's
`validate_config(config)` so a bad value stops the run before any compute
with a message naming the key.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

import ml_collections


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


def diff_keys(old: Any, new: Any) -> list[str]:
  """Dotted keys whose values differ between two configs (or JSON dicts)."""
  a, b = flatten(to_dict(old)), flatten(to_dict(new))
  return sorted(k for k in set(a) | set(b)
                if json.dumps(a.get(k, '<missing>'), sort_keys=True)
                != json.dumps(b.get(k, '<missing>'), sort_keys=True))
