"""The GPU speed-ups that need no Transformer Engine: Megatron's compiled SwiGLU fusion and
torch's fused AdamW. On CPU only the selection rules run; the CUDA tests (GPU subset of
benchmarks/gpu_check.sh) compare the fused paths with the unfused ones.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.config import OptimizerConfig, ParallelConfig, TrainingConfig
from megatron_amopo.model.provider import compiled_fusions_available, transformer_config
from megatron_amopo.runtime.comm import free_port
from megatron_amopo.testing.tiny import tiny_arch
from megatron_amopo.training.engine import Engine

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_rank():
    from megatron_amopo.runtime.distributed import DistEnv, destroy_distributed, initialize_distributed, set_seed

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    initialize_distributed(ParallelConfig(), env)  # nccl with CUDA, gloo without
    set_seed(1)
    yield
    destroy_distributed()


def test_swiglu_fusion_only_with_cuda_and_triton():
    config = transformer_config(tiny_arch("qwen2"), ParallelConfig())
    assert config.bias_activation_fusion == compiled_fusions_available()
    if not CUDA:
        assert not config.bias_activation_fusion  # torch.compile'd kernels stay off on CPU
    assert not config.bias_dropout_fusion  # dropout is 0: nothing to fuse, and compiled dropout would draw masks


def _build(**overrides):
    from megatron_amopo.model.build import build_model

    arch = tiny_arch("qwen2", num_hidden_layers=2)
    config = transformer_config(arch, ParallelConfig(), **overrides)
    return build_model(arch, config)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_swiglu_fusion_matches_unfused(one_rank):
    if not compiled_fusions_available():
        pytest.skip("no Triton: the compiled SwiGLU fusion is not selected")
    (fused,), (plain,) = _build(), _build(bias_activation_fusion=False)
    assert fused.config.bias_activation_fusion and not plain.config.bias_activation_fusion
    plain.module.load_state_dict(fused.module.state_dict())
    tokens = torch.randint(0, 512, (2, 16), device="cuda")
    pos = torch.arange(16, device="cuda").expand(2, 16)
    outs = []
    for model in (fused, plain):
        kept = []

        def forward_step(data_iterator, model):
            out = model(next(data_iterator), pos, None)
            kept.append(out.detach().float())
            return out, lambda out: (out.float().square().mean(), {})

        Engine([model], forward_step).forward_backward([tokens])
        outs.append((kept[0], {n: p.main_grad.clone() for n, p in model.named_parameters()}))
    (out_f, grads_f), (out_p, grads_p) = outs
    torch.testing.assert_close(out_f, out_p, rtol=2e-2, atol=2e-2)
    for name, g in grads_f.items():
        assert grads_p[name].abs().max() > 0
        torch.testing.assert_close(g, grads_p[name], rtol=5e-2, atol=5e-2 * float(grads_p[name].abs().max()))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fused_adamw_steps_like_foreach(one_rank):
    """build_optimizer runs torch AdamW fused (step tensors on the GPU) and updates like foreach."""
    from megatron_amopo.training.optimizer import build_optimizer

    (model_f,), (model_p,) = _build(), _build()
    model_p.module.load_state_dict(model_f.module.state_dict())  # same start (before the main copies)
    start = [p.detach().float().clone() for p in model_f.parameters()]
    results = []
    for model, fused in ((model_f, True), (model_p, False)):
        opt = build_optimizer(
            [model],
            OptimizerConfig(lr=1e-2, lr_warmup_fraction=0.0),
            TrainingConfig(micro_batch_size=1, train_iters=1, bf16=True),
        )
        groups = opt.optimizer.param_groups
        assert all(g["fused"] for g in groups)
        if not fused:
            for g in groups:
                g["fused"], g["foreach"] = False, None
        torch.manual_seed(7)
        for p in model.parameters():
            p.main_grad.copy_(torch.randn_like(p.main_grad))
        opt.step()
        if fused:
            steps = [s["step"] for s in opt.optimizer.state.values()]
            assert steps and all(t.is_cuda and float(t) == 1.0 for t in steps)
        results.append([p.detach().float().clone() for p in model.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(results[0], start)) > 1e-3  # the step moved them
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_token_logprobs_match_log_softmax(dtype, inplace):
    """The CUDA branch of token_logprobs (fused log-softmax per chunk) against fp64 log_softmax."""
    from megatron_amopo.objective.logprobs import token_logprobs

    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 40, 1000, generator=gen) * 4).cuda()
    labels = torch.randint(0, 1000, (3, 40), generator=gen).cuda()
    mask = (torch.rand(3, 40, generator=gen) > 0.3).cuda()
    weights = torch.randn(3, 40, generator=gen).double().cuda()
    leaf = base.to(dtype).requires_grad_()
    logits = leaf * 1.0  # not a leaf: in-place backward may overwrite it
    logp = token_logprobs(logits, labels, None, mask=mask, chunk_tokens=16, inplace_backward=inplace)
    (logp.double() * weights).sum().backward()
    ref_leaf = leaf.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_leaf, dim=-1).gather(-1, labels[..., None]).squeeze(-1) * mask
    (ref * weights).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logp.double(), ref.detach(), **tol)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **tol)
