"""What every TFDS builder of this package shares.

Imports nothing from edgevl_jax, so any builder can use it without a cycle.
"""
import inspect

from etils import epath
import tensorflow_datasets as tfds


class OwnCodePath:
  """Mixin: a builder's `code_path` is the file that defines its class.

  TFDS resolves `code_path` (the folder it looks in for checksums) through
  importlib_resources, which it does not install; the defining module's
  file is all it needs. Put it before the TFDS base class.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))
