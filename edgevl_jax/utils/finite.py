"""Refuse checkpoints with NaN or inf values, naming each bad tensor.

A single NaN weight makes every output NaN and every accuracy chance level,
which a run would otherwise report with exit code 0.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def non_finite(tensors: Mapping[str, Any]) -> list[tuple[str, int, int]]:
  """[(name, number of NaN/inf values, size)] of the floating tensors."""
  bad = []
  for name, value in tensors.items():
    x = np.asarray(value)
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
      continue
    count = int(x.size - np.count_nonzero(np.isfinite(x)))
    if count:
      bad.append((name, count, int(x.size)))
  return bad


def require_finite(tensors: Mapping[str, Any], *, where: str,
                   fix: str) -> None:
  """Raises ValueError listing every tensor holding NaN or inf.

  Args:
    tensors: name -> array (e.g. an HF state dict; names are kept as is).
    where: what holds them (the checkpoint folder or file), for the message.
    fix: what the user should do about it.
  """
  bad = non_finite(tensors)
  if not bad:
    return
  shown = "; ".join(f"{name!r}: {count} of {size} values are NaN or inf"
                    for name, count, size in bad[:10])
  more = f"; and {len(bad) - 10} more tensors" if len(bad) > 10 else ""
  raise ValueError(
      f"{where}: {len(bad)} tensor(s) hold NaN or inf values ({shown}{more}); "
      f"{fix}.")
