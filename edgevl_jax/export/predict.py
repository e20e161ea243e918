r"""Zero-shot predictions of an exported EdgeVL artefact on an image folder.

  python -m edgevl_jax.export.predict --artifact=DIR --images=FOLDER

Prints one line per image, `filename<TAB>class<TAB>confidence`, in file-name
order. Images (PNG, JPEG, ...) are converted to RGB (a single-channel depth
PNG is repeated to 3 channels, min-max rescaled first when it is 16-bit) and
resized to the artefact's image size (bicubic, no crop), as at test time.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) uint8 RGB of an image file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    if img.mode in ("I", "I;16", "I;16B", "F"):
      # 16-bit depth: per-image min-max to [0, 255] like the depth transform.
      arr = np.asarray(img, np.float32)
      lo, hi = float(arr.min()), float(arr.max())
      arr = (arr - lo) / max(hi - lo, 1e-6) * 255.0
      img = Image.fromarray(arr.astype(np.uint8))
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.uint8)


def list_images(folder: str) -> list[str]:
  """Sorted image file names in `folder` (not recursive)."""
  if not os.path.isdir(folder):
    raise ValueError(f"--images={folder!r} is not a folder; pass a folder of "
                     "image files.")
  names = sorted(n for n in os.listdir(folder)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ValueError(f"--images={folder!r} holds no image files "
                     f"({', '.join(IMAGE_EXTENSIONS)}).")
  return names


def predict_folder(artifact_dir: str, folder: str, *, batch_size: int = 32
                   ) -> list[tuple[str, str, float]]:
  """[(filename, class name, confidence)] for every image in `folder`."""
  from edgevl_jax.export import artifact as artifact_lib  # pylint: disable=g-import-not-at-top
  art = artifact_lib.load_artifact(artifact_dir)
  names = list_images(folder)
  rows = []
  for start in range(0, len(names), batch_size):
    chunk = names[start:start + batch_size]
    images = np.stack([load_image(os.path.join(folder, n), art.image_size)
                       for n in chunk])
    emb, classes = art(images)
    probs = art.scores(emb)
    for name, c, p in zip(chunk, classes, probs):
      rows.append((name, art.class_names[int(c)], float(p[int(c)])))
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--artifact", required=True,
                      help="folder written by export.artifact.export_artifact")
  parser.add_argument("--images", required=True, help="folder of images")
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args(argv)
  try:
    rows = predict_folder(args.artifact, args.images,
                          batch_size=args.batch_size)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, cls, conf in rows:
    print(f"{name}\t{cls}\t{conf:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
