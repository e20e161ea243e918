"""Teacher-stage x student-stage CKA heat maps: PNG (annotated) + JSON.

Cell (i, j) = CKA(teacher stage i, student stage j) on the same images
(OFA-KD, Fig. 1): homogeneous pairs are bright near the diagonal,
heterogeneous pairs dim.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np


def _check(matrix: np.ndarray, row_labels: Sequence[str],
           col_labels: Sequence[str]) -> np.ndarray:
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"CKA matrix of shape {m.shape} does not match "
                     f"{len(row_labels)} teacher x {len(col_labels)} student "
                     f"labels.")
  return m


def to_json(matrix: Any, *, row_labels: Sequence[str],
            col_labels: Sequence[str], **meta: Any) -> dict[str, Any]:
  """JSON-ready dict: {'teacher_stages', 'student_stages', 'cka', **meta}.

  NaN cells (zero-variance stages) become null.
  """
  m = _check(matrix, row_labels, col_labels)
  rows = [[None if not np.isfinite(v) else float(v) for v in r] for r in m]
  return {"teacher_stages": list(row_labels),
          "student_stages": list(col_labels), "cka": rows, **meta}


def write_json(path: str, matrix: Any, *, row_labels: Sequence[str],
               col_labels: Sequence[str], **meta: Any) -> dict[str, Any]:
  """Writes `to_json(...)` to `path` atomically; returns the dict."""
  data = to_json(matrix, row_labels=row_labels, col_labels=col_labels, **meta)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)
  return data


def plot(matrix: Any, *, row_labels: Sequence[str],
         col_labels: Sequence[str], title: str = "", ax: Any = None,
         vmin: float = 0.0, vmax: float = 1.0) -> Any:
  """Draws the annotated heat map on `ax` (a new figure if None).

  Returns the matplotlib Figure. Rows (y) are teacher stages, columns (x)
  student stages; each cell shows its value with 2 decimals ("nan" for
  zero-variance stages).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  if ax is None:
    matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  m = _check(matrix, row_labels, col_labels)
  if ax is None:
    size = (1.2 + 0.9 * len(col_labels), 1.0 + 0.8 * len(row_labels))
    fig, ax = plt.subplots(figsize=size)
  else:
    fig = ax.figure
  image = ax.imshow(np.ma.masked_invalid(m), cmap="magma", vmin=vmin,
                    vmax=vmax, origin="lower", aspect="auto")
  ax.set_xticks(range(len(col_labels)), labels=list(col_labels),
                rotation=45, ha="right")
  ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
  ax.set_xlabel("student stage")
  ax.set_ylabel("teacher stage")
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      v = m[i, j]
      dark = not np.isfinite(v) or v < vmin + 0.6 * (vmax - vmin)
      ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}",
              ha="center", va="center", fontsize=8,
              color="white" if dark else "black")
  if title:
    ax.set_title(title)
  fig.colorbar(image, ax=ax, label="CKA")
  fig.tight_layout()
  return fig


def save_png(path: str, matrix: Any, *, row_labels: Sequence[str],
             col_labels: Sequence[str], title: str = "") -> str:
  """Renders `plot(...)` to a PNG at `path` (Agg backend); returns path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = plot(matrix, row_labels=row_labels, col_labels=col_labels,
             title=title)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path
