"""megatron-amopo: AMoPO preference training on Megatron-Core."""

__version__ = "0.1.0"
