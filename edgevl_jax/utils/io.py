"""Every file the project writes is written atomically; JSON is read safely.

    with io.atomic_path(path) as tmp:      # any writer: np.save, savefig...
      np.save(tmp, array)
    io.atomic_write_text(path, text)
    io.atomic_write_json(path, {'a': 1})
    cfg = io.read_json(path, fix='re-save the model with save_pretrained')

A writer produces a temporary file beside `path` (same folder, so the final
rename stays on one filesystem) and renames it over `path` only once it is
complete and flushed: a crash or a kill leaves either the old file or the
new one, never a half-written file. stdlib only, so every layer of the
package (data, models, analysis, run, jobs) may use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary path; renames it to `path` when the block succeeds.

  The temporary name keeps `path`'s suffix (e.g. '.npy', '.png'), so writers
  that infer the format from the name (numpy, matplotlib) behave alike.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  base = os.path.basename(path)
  suffix = base[base.index('.'):] if '.' in base else ''
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.tmp-{base}-', suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def atomic_write_json(path: str | os.PathLike[str], value: Any, *,
                      indent: int | None = 2) -> None:
  """JSON with sorted keys and a final newline."""
  atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=True)
                    + '\n')


def read_json(path: str | os.PathLike[str], *, fix: str = '',
              required: Sequence[str] = ()) -> dict[str, Any]:
  """The JSON object stored in `path`.

  Args:
    path: the file.
    fix: what the user should do, appended to every error (e.g. "re-export
      the artefact"); a generic hint when empty.
    required: top-level keys that must be present.

  Returns:
    The decoded dict.

  Raises:
    ValueError: naming `path`, what is wrong with it, and `fix`: a missing,
      unreadable, empty, truncated or non-JSON file, a top level that is not
      an object, or an absent required key.
  """
  path = os.fspath(path)
  fix = fix or 'restore or re-create the file'
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError as e:
    raise ValueError(f'{path} does not exist; {fix}.') from e
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} cannot be read ({type(e).__name__}: {e}); '
                     f'{fix}.') from e
  if not text.strip():
    raise ValueError(f'{path} is empty (0 bytes of JSON); {fix}.')
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f'{path} is not valid JSON ({e.msg} at line {e.lineno} column '
        f'{e.colno}; the file may be truncated or hand-edited); {fix}.'
    ) from e
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, expected '
                     f'an object {{...}}; {fix}.')
  missing = [k for k in required if k not in value]
  if missing:
    raise ValueError(f'{path} has no {", ".join(map(repr, missing))} '
                     f'(top-level keys: {sorted(value)}); {fix}.')
  return value
