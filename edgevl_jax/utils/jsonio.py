"""Read a JSON file, or raise one ValueError that names the file and the fix.

    cfg = jsonio.read_json(path, fix="re-save the model with save_pretrained")
    index = jsonio.read_json(path, required=("weight_map",))

A missing, unreadable, truncated or non-JSON file, a top level that is not an
object, or an absent required key all become `ValueError` (what job
validation turns into a one-line usage error), never a bare
`json.JSONDecodeError` / `KeyError` traceback.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence


def read_json(path: str | os.PathLike[str], *, fix: str = "",
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
    ValueError: naming `path`, what is wrong with it, and `fix`.
  """
  path = os.fspath(path)
  fix = fix or "restore or re-create the file"
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError as e:
    raise ValueError(f"{path} does not exist; {fix}.") from e
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                     f"{fix}.") from e
  if not text.strip():
    raise ValueError(f"{path} is empty (0 bytes of JSON); {fix}.")
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
        f"{e.colno}; the file may be truncated or hand-edited); {fix}."
    ) from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected "
                     f"an object {{...}}; {fix}.")
  missing = [k for k in required if k not in value]
  if missing:
    raise ValueError(f"{path} has no {', '.join(map(repr, missing))} "
                     f"(top-level keys: {sorted(value)}); {fix}.")
  return value
