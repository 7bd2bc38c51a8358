"""Mistral (``MistralForCausalLM``): Llama's tensor names and shapes, no biases, untied embeddings.

Mistral configs declare ``sliding_window``; Megatron-Core's attention here is full
causal, which matches for sequences no longer than the window.
"""

from megatron_amopo.convert.llama import TABLE  # same tensor names, shapes and transforms

__all__ = ["TABLE"]
