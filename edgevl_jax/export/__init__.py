"""edgevl_jax.export."""
from edgevl_jax.export.size import model_size, size_report
