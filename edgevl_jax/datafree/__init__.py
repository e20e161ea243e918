"""Data-free adversarial distillation (CDFKD-MFS): teachers, iteration,
attention aggregation."""
