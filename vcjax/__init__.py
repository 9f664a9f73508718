"""vcjax: JAX-accelerated, calibrated metrics for virtual-cell models."""

__version__ = "0.1.0"
