"""Memory pre-flight: a run that will not fit is refused with the estimate, the limit and the fixes."""

from __future__ import annotations

import pytest

from megatron_amopo.config import run_arg_parser, run_config_from_args
from megatron_amopo.model import memory
from megatron_amopo.training import preflight

# SmolLM2-135M's shape (LlamaForCausalLM): the model of docs/SCALING.md's CPU calibration.
SMOLLM2 = dict(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def _cfg(*flags: str):
    return run_config_from_args(run_arg_parser().parse_args(["--train-iters", "1", "--seq-length", "512", *flags]))


@pytest.fixture
def arch():
    from megatron_amopo.model.architectures import arch_from_hf_config

    return arch_from_hf_config(SMOLLM2)


def test_refused_with_estimate_limit_and_fixes(arch, monkeypatch):
    cfg = _cfg("--micro-batch-size", "2", "--global-batch-size", "2")
    recompute = _cfg("--micro-batch-size", "2", "--global-batch-size", "2", "--recompute-granularity", "full")
    limit = f"{preflight.estimate(arch, recompute, 1, 3, training=True, device='cpu').total / memory.GiB + 0.3:.2f}"
    monkeypatch.setenv(preflight.LIMIT_ENV, limit)
    with pytest.raises(preflight.InsufficientMemory) as err:
        preflight.check_memory(arch, cfg, training=True)
    msg = str(err.value)
    assert "will not fit" in msg and f"{preflight.LIMIT_ENV}={limit}" in msg and "--no-memory-check" in msg
    assert "Fixes that would fit: --recompute-granularity full" in msg
    est = preflight.estimate(arch, cfg, 1, 3, training=True, device="cpu")
    assert f"activations {est.peak.activations / memory.GiB:.2f}" in msg


def test_fixes_are_only_those_that_fit(arch):
    cfg = _cfg("--micro-batch-size", "4", "--global-batch-size", "4")
    full = preflight.estimate(
        arch,
        _cfg("--micro-batch-size", "4", "--global-batch-size", "4", "--recompute-granularity", "full"),
        1,
        3,
        training=True,
        device="cpu",
    )
    for smaller in (1, 2):
        est = preflight.estimate(
            arch,
            _cfg("--micro-batch-size", str(smaller), "--global-batch-size", "4"),
            1,
            3,
            training=True,
            device="cpu",
        )
        limit = est.total + 2**20
        fixes = preflight._fixes(arch, cfg, 1, 3, limit, True, None, None, "cpu")
        assert any(f.startswith(f"--micro-batch-size {smaller} ") for f in fixes)
        assert any("recompute" in f for f in fixes) == (full.total <= limit)
        assert not any(f.startswith("--micro-batch-size 3 ") for f in fixes)  # 3 does not fit in 2's limit


def test_fits_and_override(arch, monkeypatch, capsys):
    cfg = _cfg("--micro-batch-size", "1", "--recompute-granularity", "full", "--global-batch-size", "8")
    monkeypatch.setenv(preflight.LIMIT_ENV, "1000")
    assert preflight.check_memory(arch, cfg, training=True) is not None
    assert "memory pre-flight: estimated peak per rank" in capsys.readouterr().out
    monkeypatch.setenv(preflight.LIMIT_ENV, "0.01")
    preflight.check_memory(arch, _cfg("--micro-batch-size", "1", "--no-memory-check"), training=True)
    assert "warning: memory pre-flight" in capsys.readouterr().out


def test_evaluation_needs_less_than_training(arch):
    cfg = _cfg("--micro-batch-size", "2", "--global-batch-size", "2")
    train = preflight.estimate(arch, cfg, 1, 3, training=True, device="cpu")
    evaluate = preflight.estimate(arch, cfg, 1, 3, training=False, device="cpu")
    assert evaluate.peak.grads == evaluate.peak.optimizer == 0 and evaluate.total < train.total / 2


def test_fused_output_layer_holds_no_logits(arch):
    """--amopo-output-layer fused: the output term is a chunk and the weight-gradient accumulator, whatever the
    tokens; the logits path grows with them."""

    def output_term(seq: str, mbs: str, *extra: str, training: bool = True) -> int:
        cfg = run_config_from_args(
            run_arg_parser().parse_args(
                ["--train-iters", "1", "--seq-length", seq, "--micro-batch-size", mbs, "--global-batch-size", mbs]
                + list(extra)
            )
        )
        return preflight.estimate(arch, cfg, 1, 3, training=training, device="cpu").peak.logits

    fused = [output_term(s, m, "--amopo-output-layer", "fused") for s, m in (("512", "1"), ("4096", "4"))]
    logits = [output_term(s, m) for s, m in (("512", "1"), ("4096", "4"))]
    assert fused[0] == fused[1] and logits[1] > 8 * (logits[0] - 4 * 2**20)
    weight_grad = 4 * arch.vocab_size * arch.hidden_size  # fp32 accumulator of the fp32 run
    assert fused[0] == 64 * 2**20 + weight_grad < logits[0]
    assert output_term("4096", "4", "--amopo-output-layer", "fused", training=False) == 64 * 2**20


def test_cpu_limit_is_shared_by_the_ranks_of_a_node(monkeypatch):
    monkeypatch.delenv(preflight.LIMIT_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one, _ = preflight.rank_limit("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    four, source = preflight.rank_limit("cpu")
    assert one is not None and "4 rank(s)" in source
    assert four < one / 2  # a quarter of the node, plus what the ranks already hold


def test_gpu_limit_is_the_free_memory_of_this_rank_s_gpu(monkeypatch):
    import torch

    monkeypatch.delenv(preflight.LIMIT_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10 * memory.GiB, 80 * memory.GiB))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    limit, source = preflight.rank_limit("cuda")
    assert limit == 10 * memory.GiB and "GPU 3 (80.0 GiB in all)" in source


def test_distributed_optimizer_save_gather_is_counted(arch, monkeypatch, tmp_path):
    """Saving the distributed optimizer builds the whole optimizer state in host memory (measured on
    SmolLM2-135M DP2: +~2 GiB per rank): a run whose steps fit but whose first save would not is refused."""
    flags = ("--micro-batch-size", "1", "--global-batch-size", "2", "--recompute-granularity", "full")
    dist_opt = (*flags, "--use-distributed-optimizer")
    n = memory.model_parameter_count(arch)
    for world in (1, 2):
        est = preflight.estimate(arch, _cfg(*dist_opt, "--save", str(tmp_path)), world, 3, training=True, device="cpu")
        assert est.save_host == int(12 * n * (1 + 1 / world))
        assert est.total == est.at_save > est.peak.total + est.process
        assert "a checkpoint save gathers" in est.describe()
    no_save = preflight.estimate(arch, _cfg(*dist_opt), 1, 3, training=True, device="cpu")
    plain = preflight.estimate(arch, _cfg(*flags, "--save", str(tmp_path)), 1, 3, training=True, device="cpu")
    evaluate = preflight.estimate(arch, _cfg(*dist_opt, "--save", str(tmp_path)), 1, 3, training=False, device="cpu")
    assert no_save.save_host == plain.save_host == evaluate.save_host == 0
    saving = preflight.estimate(arch, _cfg(*dist_opt, "--save", str(tmp_path)), 1, 3, training=True, device="cpu")
    limit = f"{(max(no_save.total, plain.total) + saving.total) / 2 / memory.GiB:.2f}"
    monkeypatch.setenv(preflight.LIMIT_ENV, limit)
    preflight.check_memory(arch, _cfg(*dist_opt), training=True)  # no save: fits
    with pytest.raises(preflight.InsufficientMemory) as err:
        preflight.check_memory(arch, _cfg(*dist_opt, "--save", str(tmp_path)), training=True)
    msg = str(err.value)
    assert "a checkpoint save gathers" in msg and "Fixes that would fit: no --use-distributed-optimizer" in msg


def test_gpu_run_checks_the_host_memory_of_its_save(arch, monkeypatch, tmp_path):
    import torch

    monkeypatch.delenv(preflight.LIMIT_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * memory.GiB, 80 * memory.GiB))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = _cfg("--micro-batch-size", "1", "--global-batch-size", "1", "--use-distributed-optimizer")
    saving = _cfg(
        "--micro-batch-size", "1", "--global-batch-size", "1", "--use-distributed-optimizer", "--save", str(tmp_path)
    )
    monkeypatch.setattr(preflight, "host_limit", lambda: (memory.GiB, "test host"))
    est = preflight.check_memory(arch, cfg, training=True)
    assert est is not None and est.save_host == 0
    with pytest.raises(preflight.InsufficientMemory, match=r"gathers 3\.\d\d GiB of optimizer state in host memory"):
        preflight.check_memory(arch, saving, training=True)
    monkeypatch.setattr(preflight, "host_limit", lambda: (8 * memory.GiB, "test host"))
    est = preflight.check_memory(arch, saving, training=True)
    assert est is not None and est.total == est.peak.total  # the GPU holds no part of the gather
