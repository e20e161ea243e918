"""Plots of a run: metric curves and accuracy bar charts (matplotlib, Agg).

Both write their PNG atomically.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from edgevl_jax.run import metrics as metrics_lib  # pylint: disable=wrong-import-position
from edgevl_jax.utils import io  # pylint: disable=wrong-import-position


def plot_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                keys: Sequence[str] | None = None, title: str | None = None
                ) -> str:
  """Plots numeric metrics against step (one panel per key) to a PNG.

  Args:
    metrics_jsonl: a metrics.jsonl file.
    out_png: output path.
    keys: metrics to plot (default: every key containing 'loss').
    title: figure title.
  """
  records = metrics_lib.read_jsonl(metrics_jsonl)
  if keys is None:
    keys = sorted({k for r in records for k in r if 'loss' in k})
  if not keys:
    raise ValueError(f'No metric to plot in {metrics_jsonl}; pass keys=.')
  fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.5 * len(keys)),
                           squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    pts = [(r['step'], r[key]) for r in records
           if isinstance(r.get(key), (int, float))]
    if pts:
      ax.plot(*zip(*pts), lw=1.2)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('step')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with io.atomic_path(out_png) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return os.fspath(out_png)


def plot_accuracy_table(results: Mapping[str, Mapping[str, float]],
                        out_png: str | os.PathLike, *,
                        title: str = 'Zero-shot top-1 accuracy',
                        ylabel: str = 'accuracy') -> str:
  """Grouped bar chart of a nested {model/precision: {modality: acc}} dict.

  E.g. results = {'teacher': {'rgb': .9, 'depth': .3},
                  'student_int8_static': {'rgb': .8, 'depth': .7}}:
  one group per modality, one bar per model, values printed on the bars.
  """
  models = list(results)
  modalities = sorted({m for v in results.values() for m in v})
  if not models or not modalities:
    raise ValueError(f'plot_accuracy_table needs a non-empty nested dict, '
                     f'found {results!r}.')
  width = 0.8 / len(models)
  fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(modalities) * len(models)
                                  * 0.6, 3.5))
  for i, model in enumerate(models):
    xs = [j + i * width - 0.4 + width / 2 for j in range(len(modalities))]
    ys = [float(results[model].get(m, float('nan'))) for m in modalities]
    bars = ax.bar(xs, ys, width, label=model)
    ax.bar_label(bars, fmt='%.2f', fontsize=7)
  ax.set_xticks(range(len(modalities)), modalities)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=7, loc='best')
  fig.tight_layout()
  with io.atomic_path(out_png) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return os.fspath(out_png)
