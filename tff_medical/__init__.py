"""tff_medical: federated learning on medical images with per-category differential privacy."""

__version__ = '0.1.0'
