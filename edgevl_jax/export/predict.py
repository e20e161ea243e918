r"""Zero-shot predictions of an exported EdgeVL artefact on an image folder.

  python -m edgevl_jax.export.predict --artifact=DIR --images=FOLDER

DIR is an ONNX artefact (onnx_export; run with ONNX Runtime, no JAX needed:
`--model=int8_u8|int8_s8s8|fp32`, `--runtime=onnxruntime|openvino`) or a
jax.export artefact (artifact.py; needs JAX).

Prints one line per image, `filename<TAB>class<TAB>confidence`, in file-name
order. Images (PNG, JPEG, ...) are converted to RGB (a single-channel depth
PNG is repeated to 3 channels, min-max rescaled first when it is 16-bit or
float, NaN / inf pixels as holes) and resized to the artefact's image size
(bicubic, no crop), as at test time.

Files whose names do not end in an image extension are ignored. An entry
named like an image that cannot be used (a 0-byte, truncated or non-image
file, a sub-folder called `x.png`) is skipped with one warning line on
stderr naming it; the other images are still predicted, and the exit code
is then 1, after a final line saying how many were skipped. A bad artefact
or flag exits with code 2 and one `error:` line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----- image folder: listing, reading, validation (no model code) -----------
class Skipped(NamedTuple):
  """An entry named like an image that was not predicted, and why."""
  name: str
  reason: str


class UnreadableImage(ValueError):
  """An image file that cannot be decoded (empty, truncated, not an image)."""


def scan_image_folder(folder: str) -> tuple[list[str], list[Skipped]]:
  """(image file names, entries named like images that are not files).

  Both sorted; names without an image extension are ignored.

  Raises:
    ValueError: `folder` is not a folder or holds nothing named like an image.
  """
  if not os.path.isdir(folder):
    raise ValueError(f"--images={folder!r} is not a folder; pass a folder of "
                     "image files.")
  names, skipped = [], []
  for name in sorted(os.listdir(folder)):
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      continue
    if os.path.isfile(os.path.join(folder, name)):
      names.append(name)
    else:
      kind = ("a folder" if os.path.isdir(os.path.join(folder, name))
              else "not a regular file")
      skipped.append(Skipped(name, f"is {kind}, not an image file"))
  if not names and not skipped:
    raise ValueError(f"--images={folder!r} holds no image files "
                     f"({', '.join(IMAGE_EXTENSIONS)}).")
  return names, skipped


def list_images(folder: str) -> list[str]:
  """Sorted image file names in `folder` (not recursive)."""
  return scan_image_folder(folder)[0]


def read_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) uint8 RGB of an image file.

  Raises:
    UnreadableImage: the file is empty, truncated or not an image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from edgevl_jax.models import preprocess  # pylint: disable=g-import-not-at-top
  if os.path.getsize(path) == 0:
    raise UnreadableImage("is empty (0 bytes)")
  try:
    with Image.open(path) as img:
      img.load()  # decode everything now: truncation shows here
      if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float depth: per-image min-max over the finite pixels, as
        # the depth transform does; NaN / inf holes become 0.
        unit = preprocess.min_max_unit(np.asarray(img))
        img = Image.fromarray((unit * 255.0).astype(np.uint8))
      img = img.convert("RGB").resize((size, size), Image.BICUBIC)
      return np.asarray(img, np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UnreadableImage(
        f"is not a readable image (truncated or not an image: "
        f"{type(e).__name__}: {e})") from e


def load_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) uint8 RGB of an image file (see `read_image`)."""
  return read_image(path, size)


def warn_skipped(name: str, reason: str) -> None:
  """The default `on_skip`: one warning line on stderr."""
  print(f"warning: skipped {name}: {reason}", file=sys.stderr)


def read_images(folder: str, names: Sequence[str], size: int,
                on_skip: Callable[[str, str], None]
                ) -> tuple[list[str], np.ndarray | None]:
  """(names read, (N, size, size, 3) uint8); unreadable files go to on_skip."""
  kept, images = [], []
  for name in names:
    try:
      images.append(read_image(os.path.join(folder, name), size))
    except UnreadableImage as e:
      on_skip(name, str(e))
      continue
    kept.append(name)
  return kept, (np.stack(images) if images else None)


def check_batch_size(batch_size: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, int) or batch_size < 1:
    raise ValueError(f"--batch_size={batch_size!r} must be a positive integer "
                     "(images per forward pass, e.g. --batch_size=32).")


# ----- prediction -------------------------------------------------------------
def load_any(artifact_dir: str, *, model: str = "int8_u8",
             runtime: str = "onnxruntime"):
  """The ONNX artefact (edge_predict, no JAX) or the jax.export one."""
  from edgevl_jax.export import edge_predict  # pylint: disable=g-import-not-at-top
  if edge_predict.is_onnx_artifact(artifact_dir):
    return edge_predict.load(artifact_dir, model=model, runtime=runtime)
  # Only the jax.export artefact needs JAX.
  from edgevl_jax.export import artifact as artifact_lib  # pylint: disable=g-import-not-at-top
  return artifact_lib.load_artifact(artifact_dir)


def predict_folder(artifact_dir: str, folder: str, *, batch_size: int = 32,
                   on_skip: Callable[[str, str], None] | None = None,
                   model: str = "int8_u8", runtime: str = "onnxruntime"
                   ) -> list[tuple[str, str, float]]:
  """[(filename, class name, confidence)] for every readable image in folder.

  Entries named like images that cannot be read are passed to
  `on_skip(name, reason)` (default: a warning line on stderr) and left out.
  `artifact_dir` is an ONNX artefact (run with `runtime`, graph `model`:
  int8_u8, int8_s8s8 or fp32) or a jax.export artefact.
  """
  check_batch_size(batch_size)
  on_skip = on_skip or warn_skipped
  art = load_any(artifact_dir, model=model, runtime=runtime)
  names, skipped = scan_image_folder(folder)
  for s in skipped:
    on_skip(s.name, s.reason)
  rows = []
  for start in range(0, len(names), batch_size):
    chunk, images = read_images(folder, names[start:start + batch_size],
                                art.image_size, on_skip)
    if images is None:
      continue
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
  parser.add_argument("--model", default="int8_u8",
                      help="ONNX artefact graph: int8_u8 (x86 without VNNI), "
                      "int8_s8s8 (VNNI, ARM, TensorRT) or fp32")
  parser.add_argument("--runtime", default="onnxruntime",
                      help="ONNX artefact runtime: onnxruntime or openvino")
  args = parser.parse_args(argv)
  skipped = []

  def on_skip(name: str, reason: str) -> None:
    warn_skipped(name, reason)
    skipped.append(name)

  try:
    rows = predict_folder(args.artifact, args.images,
                          batch_size=args.batch_size, on_skip=on_skip,
                          model=args.model, runtime=args.runtime)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, cls, conf in rows:
    print(f"{name}\t{cls}\t{conf:.4f}")
  if skipped:
    print(f"error: {len(skipped)} of {len(skipped) + len(rows)} images were "
          f"skipped (warnings above); predicted the other {len(rows)}.",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
