"""scikit-learn's bundled digits as a TFDS dataset (32 x 32 RGB, 10 classes).

    from edgevl_jax.data import sklearn_digits
    train = sklearn_digits.load('train', data_dir=DIR)  # prepares if needed
    train.images  # (N, 32, 32, 3) uint8; train.labels (N,) int32

Importing this package registers the `sklearn_digits` builder, so
`tfds.data_source('sklearn_digits', split=..., data_dir=DIR)` works too.
"""
from edgevl_jax.data.sklearn_digits.sklearn_digits_dataset_builder import Builder
from edgevl_jax.data.sklearn_digits.sklearn_digits_dataset_builder import IMAGE_SIZE
from edgevl_jax.data.sklearn_digits.sklearn_digits_dataset_builder import load
from edgevl_jax.data.sklearn_digits.sklearn_digits_dataset_builder import NUM_CLASSES
from edgevl_jax.data.sklearn_digits.sklearn_digits_dataset_builder import Split
