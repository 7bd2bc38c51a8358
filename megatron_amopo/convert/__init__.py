"""Hugging Face <-> Megatron-Core checkpoint conversion (see docs/CONVERSION.md).

``checkpoint.store`` reads and writes the checkpoint directory layout shared with
training; ``hf_to_megatron`` / ``megatron_to_hf`` stream tensors through the
per-architecture tables (``qwen2``, ``llama``, ``mistral``) and the transforms in
``common``; ``check`` compares HF and Megatron logits.
"""
