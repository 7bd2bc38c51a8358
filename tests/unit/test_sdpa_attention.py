"""SDPAttention (fused SDPA core attention) against Megatron-Core's unfused DotProductAttention.

Same q/k/v, same masks (causal, padded, block-diagonal packed, THD), same outputs and
gradients within fp32 tolerance; the local layer spec selects it; bad input is refused with
a message. The CUDA test (skipped on CPU) pins the flash and memory-efficient kernels.
Shape legend: S positions, B rows, N query heads, G query groups, H head size.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.config import ParallelConfig
from megatron_amopo.data.batch import attention_mask_from_segments
from megatron_amopo.model.attention import SDPAttention
from megatron_amopo.model.provider import layer_spec, model_provider, transformer_config
from megatron_amopo.runtime.comm import free_port
from megatron_amopo.testing.tiny import tiny_arch

S, B, N, G, H = 12, 3, 4, 2, 8
# With CUDA present, Megatron's unfused path allocates on the GPU: compare there (fp32).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank process group with Megatron's parallel state (the unfused path needs it)."""
    from megatron_amopo.runtime.distributed import DistEnv, destroy_distributed, initialize_distributed, set_seed

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    initialize_distributed(ParallelConfig(distributed_backend="gloo"), env)
    set_seed(1)  # the unfused path forks Megatron's model-parallel RNG stream
    yield
    destroy_distributed()


def _config(**overrides):
    arch = tiny_arch("qwen2", num_attention_heads=N, num_key_value_heads=G, hidden_size=N * H)
    return transformer_config(arch, ParallelConfig(), params_dtype=torch.float32, **overrides)


def _pair(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**kw), DotProductAttention(**kw)


def _qkv(seed=0, device=DEVICE, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(S, B, N, H), (S, B, G, H), (S, B, G, H)]
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def _run(module, qkv, mask):
    out = module(*qkv, mask)
    gen = torch.Generator().manual_seed(99)
    w = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    (out.float() * w.float()).sum().backward()
    grads = [t.grad.clone() for t in qkv]
    for t in qkv:
        t.grad = None
    return out.detach(), grads


def _masks():
    seg_padded = torch.tensor([[0] * S, [1] * 9 + [-1] * 3, [2] * 5 + [-1] * 7])
    seg_packed = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [3] * 7 + [4] * 3 + [-1] * 2, [5] * 12])
    masks = {
        "causal-explicit": ~torch.ones(S, S, dtype=torch.bool).tril()[None, None],
        "padded": attention_mask_from_segments(seg_padded),
        "packed": attention_mask_from_segments(seg_packed),
    }
    return {"causal-none": None, **{k: m.to(DEVICE) for k, m in masks.items()}}


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_matches_unfused_outputs_and_grads(one_rank, mask_name):
    sdpa, ref = _pair(_config())
    mask = _masks()[mask_name]
    qkv = _qkv()
    out, grads = _run(sdpa, qkv, mask)
    out_ref, grads_ref = _run(ref, qkv, mask)
    assert out.shape == out_ref.shape == (S, B, N * H)
    torch.testing.assert_close(out, out_ref, **TOL)
    for g, g_ref in zip(grads, grads_ref):
        assert g_ref.abs().max() > 0
        torch.testing.assert_close(g, g_ref, **TOL)


def test_mask_really_matters(one_rank):
    """The packed mask changes the result relative to plain causal (the comparison can fail)."""
    sdpa, _ = _pair(_config())
    qkv = _qkv()
    out_causal, _ = _run(sdpa, qkv, None)
    out_packed, _ = _run(sdpa, qkv, _masks()["packed"])
    assert (out_causal - out_packed).abs().max() > 1e-2


def test_thd_matches_block_diagonal_rows(one_rank):
    """THD input (one packed stream + cu_seqlens) gives the rows' block-diagonal result per token."""
    from megatron.core.packed_seq_params import PackedSeqParams

    sdpa, ref = _pair(_config())
    seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [3] * 7 + [4] * 5, [5] * 12])
    q, k, v = _qkv(seed=3)
    out_rows, grads_rows = _run(ref, (q, k, v), attention_mask_from_segments(seg).to(DEVICE))
    flat = [x.detach().transpose(0, 1).reshape(B * S, *x.shape[2:]).clone().requires_grad_() for x in (q, k, v)]
    cu = torch.tensor([0, 4, 9, 12, 19, 24, 36], dtype=torch.int32, device=DEVICE)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    out = sdpa(*flat, None, packed_seq_params=params)
    w = torch.randn(out_rows.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE)
    (out * w.transpose(0, 1).reshape(B * S, -1)).sum().backward()
    torch.testing.assert_close(out, out_rows.transpose(0, 1).reshape(B * S, -1), **TOL)
    for g, g_rows in zip((t.grad for t in flat), grads_rows):
        torch.testing.assert_close(g, g_rows.transpose(0, 1).reshape(B * S, *g_rows.shape[2:]), **TOL)


def test_bad_input_is_refused(one_rank):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match="attention_dropout=0 only"):
        SDPAttention(_config(attention_dropout=0.1), 1, AttnMaskType.causal, "self")
    sdpa, _ = _pair(_config())
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention_bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1, device=DEVICE))
    bad = torch.tensor([0, 5, 30], dtype=torch.int32, device=DEVICE)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bad, cu_seqlens_kv=bad, max_seqlen_q=25, max_seqlen_kv=25)
    flat = [x.detach().reshape(S * B, *x.shape[2:]) for x in (q, k, v)]
    with pytest.raises(ValueError, match="cu_seqlens_q must run from 0 to the 36"):
        sdpa(*flat, None, packed_seq_params=params)
    with pytest.raises(ValueError, match="'thd' format"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


def test_local_spec_selects_sdpa(one_rank):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    arch = tiny_arch("qwen2")
    spec = layer_spec(arch, use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    model = model_provider(arch, transformer_config(arch, ParallelConfig()), use_te=False)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert len(cores) == arch.num_layers and all(type(c) is SDPAttention for c in cores)
    assert not any(isinstance(m, DotProductAttention) for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flash / memory-efficient kernels)")
@pytest.mark.parametrize("mask_name,backend", [("causal-none", "FLASH_ATTENTION"), ("packed", "EFFICIENT_ATTENTION")])
def test_cuda_kernels_bf16(one_rank, mask_name, backend):
    """bf16 on GPU with only the named SDPA kernel allowed, against the unfused path in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa, ref = _pair(_config())
    mask = _masks()[mask_name]
    qkv32 = _qkv(seed=5, device="cuda")
    out_ref, grads_ref = _run(ref, qkv32, mask)
    qkv16 = [t.detach().to(torch.bfloat16).requires_grad_() for t in qkv32]
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out, grads = _run(sdpa, qkv16, mask)
    torch.testing.assert_close(out.float(), out_ref, rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (variable-length flash attention)")
def test_cuda_thd_varlen_bf16(one_rank):
    """bf16 THD on GPU takes torch's variable-length flash kernel (one call, no host sync) and
    matches the block-diagonal rows of the unfused path in fp32."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_amopo.model.attention import varlen_causal_attention

    attend = varlen_causal_attention()
    if attend is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    sdpa, ref = _pair(_config())
    seg = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [3] * 7 + [4] * 5, [5] * 12])
    q, k, v = _qkv(seed=4, device="cuda")
    out_rows, grads_rows = _run(ref, (q, k, v), attention_mask_from_segments(seg).cuda())
    flat = [
        x.detach().transpose(0, 1).reshape(B * S, *x.shape[2:]).to(torch.bfloat16).requires_grad_() for x in (q, k, v)
    ]
    cu = torch.tensor([0, 4, 9, 12, 19, 24, 36], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    out = sdpa(*flat, None, packed_seq_params=params)
    direct = attend(*(x.detach() for x in flat), cu, 12, sdpa.softmax_scale).reshape(B * S, -1)
    assert torch.equal(out.detach(), direct)  # the module took the variable-length kernel
    w = torch.randn(out_rows.shape, generator=torch.Generator().manual_seed(99)).cuda()
    (out.float() * w.transpose(0, 1).reshape(B * S, -1)).sum().backward()
    torch.testing.assert_close(out.float(), out_rows.transpose(0, 1).reshape(B * S, -1), rtol=2e-2, atol=2e-2)
    for g, g_rows in zip((t.grad for t in flat), grads_rows):
        torch.testing.assert_close(
            g.float(), g_rows.transpose(0, 1).reshape(B * S, *g_rows.shape[2:]), rtol=5e-2, atol=5e-2
        )
