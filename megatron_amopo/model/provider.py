"""Megatron-Core ``GPTModel`` for a ``ModelArch`` and a parallel layout.

The Transformer Engine layer spec is chosen when CUDA and TE are importable, the
local spec otherwise (CPU). Parameters are bf16 on GPU and fp32 on CPU unless the
caller says otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_amopo.config import ParallelConfig
from megatron_amopo.model.architectures import ModelArch, validate_layout


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def compiled_fusions_available() -> bool:
    """Megatron's SwiGLU fusion (``fusions/fused_bias_swiglu.py``) is ``torch.compile``d: on GPU
    that needs a working Triton toolchain (CUDA builds of torch ship Triton; it compiles its
    launcher with the system's C compiler and Python headers). It needs no Transformer Engine.
    Probed once per process with a tiny compiled kernel; a failure is reported and the
    unfused activation is used instead."""
    if not torch.cuda.is_available():
        return False
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    try:
        probe = torch.compile(lambda y: F.silu(y[..., :8]) * y[..., 8:], dynamic=False)
        x = torch.ones(4, 16, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(probe(x), F.silu(x[..., :8]) * x[..., 8:])
    except Exception as err:  # noqa: BLE001 - any toolchain failure means: do not fuse
        print(
            f"megatron_amopo: torch.compile does not work here ({type(err).__name__}: {str(err)[:200]}); "
            "using the unfused SwiGLU",
            flush=True,
        )
        return False
    return True


def transformer_config(
    arch: ModelArch,
    parallel: ParallelConfig,
    *,
    params_dtype: Optional[torch.dtype] = None,
    recompute_granularity: Optional[str] = None,
    use_cpu_initialization: Optional[bool] = None,
    **overrides,
):
    """Build Megatron-Core's ``TransformerConfig`` for ``arch`` at ``parallel``."""
    from megatron.core.transformer import TransformerConfig

    validate_layout(arch, parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    cuda = torch.cuda.is_available()
    dtype = params_dtype or (torch.bfloat16 if cuda else torch.float32)
    fused = cuda and transformer_engine_available()
    # One compiled SiLU-and-multiply kernel pair instead of silu, mul and their autograd graph;
    # it also saves only the MLP's input for backward (not the SiLU output).
    swiglu_fused = fused or compiled_fusions_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda if use_cpu_initialization is None else use_cpu_initialization,
        # Fused kernels need CUDA (and most of them TE); off on CPU.
        bias_activation_fusion=swiglu_fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        masked_softmax_fusion=fused,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, use_te: Optional[bool] = None):
    """TE spec on GPU with TE, local spec otherwise (norm via torch RMSNorm, attention via SDPA)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te if use_te is not None else transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False)
    # Fused SDPA instead of the unfused matmul-softmax-matmul DotProductAttention.
    from megatron_amopo.model.attention import SDPAttention

    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def model_provider(
    arch: ModelArch,
    config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
):
    """Build this rank's ``GPTModel`` stage (Megatron's ``model_provider`` convention)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def build_model_stage(arch: ModelArch, config, use_te: Optional[bool] = None):
    """This rank's stage, with pre/post-process flags from Megatron's parallel state."""
    from megatron.core import parallel_state

    return model_provider(
        arch,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=use_te,
    )
