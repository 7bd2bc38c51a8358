"""Build any rank's model shard for a target layout on the meta device, without GPUs or peers.

    python pretrain_amopo.py --dry-run --world-size 32 --rank 0 --hf-config examples/model_configs/qwen2.5-32b.json \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel --bf16 \\
        --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 128 --train-epochs 3

Each requested rank joins a process group of torch's ``fake`` backend (collectives
return at once, no peers needed) of the full world size, Megatron-Core's parallel
groups are created for the layout (``create_gloo_process_groups=False``: gloo would
need real peers), and the rank's ``GPTModel`` stage is built, from the TransformerConfig of the run
set-up's first step (``training.run.setup_model``, run once: it reads the model and refuses what a real
run would, layout and attention window), under
``torch.device("meta")`` with initialisation off, so nothing is allocated. Its
parameters are compared tensor by tensor with ``megatron_amopo.model.memory``'s shapes,
whose arithmetic gives the memory estimate printed next to them. ``--rank all``
builds one rank per (TP, PP) coordinate and reports every rank (data-parallel
replicas hold the same shard). The local layer spec is built (Transformer Engine is
not needed); TE fuses the two norms into ``linear_qkv`` / ``linear_fc1`` under other
names with the same shapes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Optional

import torch

from megatron_amopo.config import (
    DryRunConfig,
    RunConfig,
    add_dry_run_args,
    dataclass_from_args,
    run_arg_parser,
    run_config_from_args,
    schedule_unused,
)
from megatron_amopo.model import memory
from megatron_amopo.model.architectures import ModelArch, arch_from_hf_config, load_hf_config
from megatron_amopo.training.preflight import workload_and_layout

if TYPE_CHECKING:
    from megatron_amopo.training.run import ModelSetup

GiB = memory.GiB


def parse_args(argv: list[str]) -> tuple[DryRunConfig, RunConfig]:
    """Dry-run options plus the training flags; of those only the layout, batching and precision matter."""
    parser = run_arg_parser(
        "pretrain_amopo.py --dry-run: build one rank's shard on the meta device (no GPUs, "
        "no peers) and print the memory estimate"
    )
    add_dry_run_args(parser)
    args = parser.parse_args(argv)
    schedule_unused(args)
    if (
        getattr(args, "TrainingConfig.micro_batch_size") is None
        and getattr(args, "TrainingConfig.micro_batch_tokens") is None
    ):
        setattr(args, "TrainingConfig.micro_batch_size", 1)
    cfg = run_config_from_args(args)
    ours = dataclass_from_args(DryRunConfig, args)
    if ours.world_size is None:
        ours = replace(ours, world_size=cfg.parallel.model_parallel_size)
    if getattr(args, "TrainingConfig.global_batch_size") is None:  # enough micro-batches to fill the pipeline
        _, layout = workload_and_layout(cfg, ours.world_size, 3)
        gbs = layout.micro_batch_size * layout.dp * layout.pp
        cfg = replace(cfg, training=replace(cfg.training, global_batch_size=gbs))
    return ours, cfg


def hf_arch(hf_config: Optional[str], load: Optional[str]) -> Optional[ModelArch]:
    """The model of ``--hf-config``; None when it comes from ``--load`` (read by the run set-up)."""
    if hf_config:
        return arch_from_hf_config(load_hf_config(hf_config))
    if load:
        return None
    raise ValueError("--dry-run needs the model: give --hf-config PATH or --load CKPT (with amopo_model.json)")


def resolve_ranks(rank: str, world_size: int, cfg: RunConfig) -> list[int]:
    """Global ranks to build; checks the layout fits the world size first."""
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    cfg.parallel.data_parallel_size(world_size)  # ValueError naming TP x PP x CP
    if rank == "all":
        return list(range(world_size))
    try:
        r = int(rank)
    except ValueError:
        raise ValueError(f"--rank must be an integer or 'all', got {rank!r}") from None
    if not 0 <= r < world_size:
        raise ValueError(f"--rank {r} is out of range for --world-size {world_size} (ranks 0..{world_size - 1})")
    return [r]


def init_fake_rank(cfg: RunConfig, world_size: int, rank: int) -> dict[str, int]:
    """Join a fake process group as ``rank`` and create Megatron's groups; returns its coordinates."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    teardown()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    par = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        create_gloo_process_groups=False,
    )
    return dict(
        rank=rank,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
    )


def teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def build_meta_stage(model: ModelSetup) -> torch.nn.Module:
    """This rank's GPTModel stage on the meta device from the run set-up's TransformerConfig
    (call after ``init_fake_rank``)."""
    from megatron_amopo.model.provider import build_model_stage

    with torch.device("meta"):
        return build_model_stage(model.arch, model.config, use_te=False)


def check_against_plan(model: torch.nn.Module, arch: ModelArch, tp: int, pp: int, pp_rank: int) -> dict:
    """Every parameter's shape must be the planner's; returns {name: shape}."""
    expected = memory.rank_parameter_shapes(arch, tp, pp, pp_rank)
    built = {name: tuple(p.shape) for name, p in model.named_parameters()}
    wrong = {
        n: (built.get(n), expected[n][0] if n in expected else None)
        for n in set(built) | set(expected)
        if built.get(n) != (expected[n][0] if n in expected else None)
    }
    if wrong:
        sample = dict(sorted(wrong.items())[:5])
        raise RuntimeError(
            f"built shard differs from megatron_amopo.model.memory at {len(wrong)} tensors "
            f"(name: (built, planned)): {sample}"
        )
    return built


def rank_report(model: torch.nn.Module, coords: dict, arch: ModelArch, work, layout) -> dict:
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    mem = memory.stage_memory(arch, work, layout, coords["pp_rank"])
    return dict(
        coords,
        params=numel,
        param_bytes=numel * work.param_bytes,
        built_bytes=sum(p.numel() * p.element_size() for p in params),
        memory={k: v for k, v in asdict(mem).items() if k != "notes"} | {"total": mem.total},
        memory_notes=mem.notes,
    )


def run(ours: DryRunConfig, cfg: RunConfig) -> dict:
    from megatron_amopo.runtime import cpu_compat
    from megatron_amopo.training.run import setup_model

    from_hf = hf_arch(ours.hf_config, cfg.checkpoint.load)
    world_size = ours.world_size or cfg.parallel.model_parallel_size
    ranks = resolve_ranks(ours.rank, world_size, cfg)
    cpu_compat.apply()  # Megatron-Core's CUDA assumptions, as in initialize_distributed
    # The run set-up's first step: every refusal of the model a real run gives (layout, attention window).
    model = setup_model(cfg, arch=from_hf, perform_initialization=False, use_cpu_initialization=True)
    arch = model.arch
    dims = ours.num_dimensions or (len(cfg.data.dimensions) if cfg.data.dimensions else 3)
    work, layout = workload_and_layout(cfg, world_size, dims)
    tp, pp = layout.tp, layout.pp
    built: dict[tuple[int, int], dict] = {}
    reports = []
    try:
        for rank in ranks:
            coords = init_fake_rank(cfg, world_size, rank)
            key = (coords["tp_rank"], coords["pp_rank"])
            if key not in built:
                stage = build_meta_stage(model)
                shapes = check_against_plan(stage, arch, tp, pp, coords["pp_rank"])
                built[key] = dict(rank_report(stage, coords, arch, work, layout), parameters=shapes)
            reports.append({**built[key], **coords})
    finally:
        teardown()
    peak = memory.peak_memory(arch, work, layout)
    return dict(
        world_size=ours.world_size,
        layout=asdict(layout),
        workload=asdict(work),
        arch=arch.to_dict(),
        model_parameters=memory.model_parameter_count(arch),
        ranks=reports,
        peak_stage=peak.pp_rank,
        peak_bytes=peak.total,
        budget_bytes=int((ours.gpu_memory_gib - ours.reserve_gib) * GiB),
    )


def print_report(report: dict) -> None:
    lay = memory.Layout(**report["layout"])
    print(
        f"dry run: {report['arch']['model_type']} with {report['model_parameters']:,} parameters, "
        f"world size {report['world_size']} = {lay.describe()}"
    )
    for r in report["ranks"]:
        m = r["memory"]
        print(
            f"rank {r['rank']:>5} (tp {r['tp_rank']} pp {r['pp_rank']} dp {r['dp_rank']}): {r['params']:,} "
            f"parameters, {r['param_bytes'] / GiB:.2f} GiB weights | estimate: grads {m['grads'] / GiB:.2f}, "
            f"optimizer {m['optimizer'] / GiB:.2f}, activations {m['activations'] / GiB:.2f}, logits "
            f"{m['logits'] / GiB:.2f}; total {m['total'] / GiB:.2f} GiB"
        )
    fits = report["peak_bytes"] <= report["budget_bytes"]
    print(
        f"peak estimate {report['peak_bytes'] / GiB:.2f} GiB on pipeline stage {report['peak_stage']}; "
        f"usable {report['budget_bytes'] / GiB:.2f} GiB per GPU: {'fits' if fits else 'DOES NOT FIT'}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ours, cfg = parse_args(argv)
        report = run(ours, cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report)
    if ours.json:
        with open(ours.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0
