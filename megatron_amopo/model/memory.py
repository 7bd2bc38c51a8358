"""Per-GPU memory model of an AMoPO run and a planner for its parallel layout.

Arithmetic on a ``ModelArch``: exact parameter shapes per rank (the dry run checks them against a
real Megatron-Core shard), model and optimizer state, activations with and without recomputation,
and the logits. The formulas, their sources and worked numbers are in docs/SCALING.md, section 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Optional

from megatron_amopo.model.architectures import ModelArch, validate_layout
from megatron_amopo.objective.fused_logprobs import DEFAULT_CHUNK_BYTES as FUSED_CHUNK_BYTES
from megatron_amopo.objective.logprobs import DEFAULT_CHUNK_BYTES

LOGPROB_CHUNK_BYTES = DEFAULT_CHUNK_BYTES["cuda"]  # the GPU work chunk; Workload.device picks the chunk

GiB = 2**30
RECOMPUTE = ("none", "selective", "full")
TIGHT = 0.9  # fraction of the usable memory above which a layout counts as tight


# ---------------------------------------------------------------------------
# Parameters: exact shapes of one rank's shard


def _layer_shapes(arch: ModelArch, tp: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name within a layer, local shape, replicated over TP) for one transformer layer."""
    h, qkv = arch.hidden_size, (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels
    shapes = [
        ("input_layernorm.weight", (h,), True),
        ("self_attention.linear_qkv.weight", (qkv // tp, h), False),
    ]
    if arch.qkv_bias:
        shapes.append(("self_attention.linear_qkv.bias", (qkv // tp,), False))
    shapes += [
        ("self_attention.linear_proj.weight", (h, arch.num_attention_heads * arch.kv_channels // tp), False),
        ("pre_mlp_layernorm.weight", (h,), True),
        ("mlp.linear_fc1.weight", (2 * arch.ffn_hidden_size // tp, h), False),
        ("mlp.linear_fc2.weight", (h, arch.ffn_hidden_size // tp), False),
    ]
    return shapes


def rank_parameter_shapes(arch: ModelArch, tp: int, pp: int, pp_rank: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{local parameter name: (shape, replicated over TP)} of any TP rank of stage ``pp_rank``."""
    validate_layout(arch, tp, pp)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} out of range for PP {pp}")
    h, v = arch.hidden_size, arch.vocab_size // tp
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = ((v, h), False)
    for i in range(arch.num_layers // pp):
        for name, shape, rep in _layer_shapes(arch, tp):
            out[f"decoder.layers.{i}.{name}"] = (shape, rep)
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = ((h,), True)
        if not arch.tie_word_embeddings or pp > 1:  # Megatron: a copy of the embedding on the last stage
            out["output_layer.weight"] = ((v, h), False)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ParamCount:
    sharded: int  # TP-split parameters on this rank
    replicated: int  # parameters every TP rank holds a full copy of (the norms)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


def rank_parameter_count(arch: ModelArch, tp: int, pp: int, pp_rank: int) -> ParamCount:
    shapes = rank_parameter_shapes(arch, tp, pp, pp_rank).values()
    return ParamCount(sum(_numel(s) for s, rep in shapes if not rep), sum(_numel(s) for s, rep in shapes if rep))


def model_parameter_count(arch: ModelArch, tp: int = 1, pp: int = 1) -> int:
    """Unique parameters of the model, summed over the ranks of one replica: TP-replicated
    tensors once per TP group, the tied embedding once (the last stage's copy is not unique)."""
    total = 0
    for stage in range(pp):
        c = rank_parameter_count(arch, tp, pp, stage)
        total += tp * c.sharded + c.replicated
    if arch.tie_word_embeddings and pp > 1:
        total -= arch.vocab_size * arch.hidden_size
    return total


# ---------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence parallelism needs TP > 1")

    def describe(self) -> str:
        flags = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}", f"mbs {self.micro_batch_size}"]
        flags += ["SP"] if self.sequence_parallel else []
        flags += ["dist-opt"] if self.distributed_optimizer else []
        flags += [f"recompute {self.recompute}"] if self.recompute != "none" else []
        return " ".join(flags)


@dataclass(frozen=True)
class Workload:
    """What a training step puts through the model."""

    seq_length: int = 1024
    num_dimensions: int = 3
    global_batch_size: int = 128
    param_bytes: int = 2  # bf16 weights and activations
    flash_attention: bool = True  # TE / fused attention on GPU; False = Megatron's unfused local attention
    rows: Optional[int] = None  # rows of the largest micro-batch when the data plan is known; else padded
    device: str = "cuda"  # the log-prob work chunk is sized per device (objective.logprobs)
    fused_output: bool = False  # --amopo-output-layer fused: log-probs from hidden states, no logits

    @property
    def seqs_per_group(self) -> int:
        return 2 * (self.num_dimensions + 1)  # the general pair plus one pair per dimension


def layer_activation_bytes(arch: ModelArch, work: Workload, rows: int, layout: Layout) -> int:
    """Bytes one transformer layer keeps for backward for ``rows`` sequences of S positions."""
    s, h, t, f = work.seq_length, arch.hidden_size, layout.tp, arch.ffn_hidden_size
    a, kv = arch.num_attention_heads, arch.num_query_groups * arch.kv_channels
    sr, b = s * rows, work.param_bytes
    if layout.recompute == "full":
        return b * sr * h // (t if layout.sequence_parallel else 1)
    outside_tp = b * sr * (2 * h + h + h)  # 2 norm inputs, QKV input, fc1 input (Korthikanti: 4 + 2 + 2)
    inside_tp = b * sr * (h + 2 * kv + h) + b * sr * (2 * f + f)  # Q, K, V, proj input; fc1 out, fc2 in
    if layout.recompute == "none":  # the attention core, dropped by selective recomputation
        inside_tp += 4 * a * sr if work.flash_attention else b * a * s * sr
    if layout.sequence_parallel:
        return (outside_tp + inside_tp) // t
    return outside_tp + inside_tp // t


def logits_bytes(arch: ModelArch, work: Workload, rows: int, tp: int, training: bool = True) -> int:
    """Logits [T, V/t] (and in training their gradient) in the weights' dtype, plus one fp32 work chunk.

    Fused output layer: one chunk of logits, and in training the weight gradient's fp32 accumulator
    [V/t, H] (plus a staging copy in the weights' dtype when that is 16-bit), whatever T is."""
    if work.fused_output:
        chunk = FUSED_CHUNK_BYTES[work.device]
        staging = work.param_bytes if work.param_bytes != 4 else 0
        return chunk + (4 + staging) * (arch.vocab_size // tp) * arch.hidden_size if training else chunk
    tokens = rows * work.seq_length
    copies = 2 if training else 1
    return copies * work.param_bytes * tokens * (arch.vocab_size // tp) + DEFAULT_CHUNK_BYTES[work.device]


@dataclass
class StageMemory:
    """Peak bytes on one GPU of pipeline stage ``pp_rank``."""

    pp_rank: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def microbatches_per_step(work: Workload, layout: Layout) -> int:
    per_step = layout.micro_batch_size * layout.dp
    if work.global_batch_size % per_step:
        raise ValueError(f"global batch {work.global_batch_size} not divisible by micro-batch x DP = {per_step}")
    return work.global_batch_size // per_step


def state_bytes_per_param(work: Workload, layout: Layout) -> tuple[float, float, float]:
    """(weights, gradient buffer, optimizer) bytes per parameter (Megatron mixed precision)."""
    main = 4 if work.param_bytes != 4 else 0  # fp32 main copy only when the weights are 16-bit
    opt = (main + 8) / (layout.dp if layout.distributed_optimizer else 1)
    return work.param_bytes, 4, opt


def stage_memory(arch: ModelArch, work: Workload, layout: Layout, pp_rank: int, training: bool = True) -> StageMemory:
    """``training=False``: a forward-only pass (evaluation) keeps no gradients, optimizer state or
    saved activations, only the layer being computed and the logits."""
    n = rank_parameter_count(arch, layout.tp, layout.pp, pp_rank).total
    w, g, o = state_bytes_per_param(work, layout)
    rows = work.rows or layout.micro_batch_size * work.seqs_per_group
    last = pp_rank == layout.pp - 1
    logit = logits_bytes(arch, work, rows, layout.tp, training) if last else 0
    one_layer = layer_activation_bytes(arch, work, rows, replace(layout, recompute="selective"))
    if not training:
        return StageMemory(pp_rank, n, int(n * w), 0, 0, one_layer, logit, ["forward only: one layer live"])
    in_flight = min(layout.pp - pp_rank, microbatches_per_step(work, layout))
    per_layer = layer_activation_bytes(arch, work, rows, layout)
    layers = arch.num_layers // layout.pp
    act = layers * per_layer * in_flight
    if layout.recompute == "full":  # one layer's full activations live while it is recomputed
        act += one_layer
    notes = [f"{layers} layers x {in_flight} micro-batch(es) in flight x {per_layer / GiB:.2f} GiB/layer"]
    return StageMemory(pp_rank, n, int(n * w), int(n * g), int(n * o), act, logit, notes)


def save_gather_bytes(arch: ModelArch, layout: Layout) -> int:
    """Host bytes one rank adds while it saves a checkpoint with the distributed optimizer.

    The checkpoint's optimizer format (``fully_reshardable``, training/checkpointing.py) makes every DP
    rank build its model shard's whole optimizer state in host memory, as fp32 main parameters,
    exp_avg and exp_avg_sq, after copying its own 1/DP share of each into a staging buffer:
    12 (1 + 1/DP) bytes per parameter of the largest stage. Zero without the distributed optimizer."""
    if not layout.distributed_optimizer:
        return 0
    n = max(rank_parameter_count(arch, layout.tp, layout.pp, i).total for i in range(layout.pp))
    return int(12 * n * (1 + 1 / layout.dp))


def peak_memory(arch: ModelArch, work: Workload, layout: Layout, training: bool = True) -> StageMemory:
    """The stage with the largest footprint (stage 0 holds the most activations, the last the logits)."""
    return max((stage_memory(arch, work, layout, i, training) for i in range(layout.pp)), key=lambda m: m.total)


# ---------------------------------------------------------------------------
# Planner


@dataclass
class Plan:
    layout: Layout
    peak: StageMemory
    bubble: float  # pipeline bubble fraction (p - 1) / m (Narayanan et al. 2021, Sec. 2.2)
    microbatches: int
    reasons: list[str]
    tight: bool = False

    def sort_key(self) -> tuple:
        # Cheapest first: recomputation costs compute (full: one extra forward, ~+33%),
        # then the pipeline bubble, then less model parallelism (more DP: less
        # communication per FLOP), then a larger micro-batch (better GEMM efficiency).
        # A layout within TIGHT of the budget goes after those with headroom: the
        # activation model ignores allocator fragmentation and temporary buffers.
        return (
            RECOMPUTE.index(self.layout.recompute),
            self.tight,
            round(self.bubble, 3),
            self.layout.tp * self.layout.pp,
            self.layout.tp,
            -self.layout.micro_batch_size,
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(arch: ModelArch, work: Workload, num_gpus: int, gpus_per_node: int) -> Iterator[Layout]:
    """TP within a node (Narayanan et al. 2021, takeaway 1), PP dividing the layers,
    SP whenever TP > 1 and the distributed optimizer whenever DP > 1 (both only save memory)."""
    for tp in _divisors(min(num_gpus, gpus_per_node)):
        for pp in _divisors(num_gpus // tp) if num_gpus % tp == 0 else []:
            try:
                validate_layout(arch, tp, pp)
            except ValueError:
                continue
            dp = num_gpus // (tp * pp)
            for mbs in _divisors(work.global_batch_size):
                if (work.global_batch_size // mbs) % dp or mbs > 8:
                    continue
                for rc in RECOMPUTE:
                    yield Layout(tp, pp, dp, mbs, tp > 1, dp > 1, rc)


def plan(
    arch: ModelArch,
    work: Workload,
    num_gpus: int,
    gpu_memory_gib: float,
    gpus_per_node: int = 8,
    reserve_gib: float = 6.0,
) -> tuple[list[Plan], int]:
    """Feasible layouts, best first, and how many candidates were rejected for memory.

    ``reserve_gib`` is left for the CUDA context, NCCL buffers and allocator fragmentation.
    """
    budget = (gpu_memory_gib - reserve_gib) * GiB
    feasible, rejected = [], 0
    for layout in candidate_layouts(arch, work, num_gpus, gpus_per_node):
        peak = peak_memory(arch, work, layout)
        if peak.total > budget:
            rejected += 1
            continue
        m = microbatches_per_step(work, layout)
        bubble = (layout.pp - 1) / m
        tight = peak.total > TIGHT * budget
        reasons = _reasons(layout, peak, bubble, m, budget)
        if tight:
            reasons.append(f"over {TIGHT:.0%} of the usable memory: ranked after layouts with headroom")
        feasible.append(Plan(layout, peak, bubble, m, reasons, tight))
    feasible.sort(key=Plan.sort_key)
    return _drop_dominated(feasible), rejected


def _drop_dominated(plans: list[Plan]) -> list[Plan]:
    """Keep one recomputation level per (TP, PP, mbs): the cheapest that fits."""
    seen, out = set(), []
    for p in plans:
        key = (p.layout.tp, p.layout.pp, p.layout.micro_batch_size)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _reasons(layout: Layout, peak: StageMemory, bubble: float, m: int, budget: float) -> list[str]:
    r = [
        f"peak {peak.total / GiB:.1f} GiB on stage {peak.pp_rank} of {budget / GiB:.1f} GiB usable "
        f"(weights {peak.weights / GiB:.1f}, grads {peak.grads / GiB:.1f}, optimizer {peak.optimizer / GiB:.1f}, "
        f"activations {peak.activations / GiB:.1f}, logits {peak.logits / GiB:.1f})"
    ]
    if layout.recompute != "none":
        r.append(
            f"needs {layout.recompute} recomputation to fit"
            + (" (~33% more compute)" if layout.recompute == "full" else " (attention core only, cheap)")
        )
    if layout.pp > 1:
        r.append(f"pipeline bubble (p-1)/m = {layout.pp - 1}/{m} = {bubble:.1%}")
    r.append(f"{m} micro-batch(es) per DP rank per step; model-parallel size {layout.tp * layout.pp}")
    return r


def format_memory(mem: StageMemory) -> str:
    parts = [
        ("weights", mem.weights),
        ("grads", mem.grads),
        ("optimizer", mem.optimizer),
        ("activations", mem.activations),
        ("logits", mem.logits),
    ]
    body = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts)
    return f"stage {mem.pp_rank}: {mem.params:,} params; {body}; total {mem.total / GiB:.2f} GiB"


def default_workload(
    seq_length: int = 1024,
    num_dimensions: int = 3,
    global_batch_size: int = 128,
    bf16: bool = True,
    flash_attention: Optional[bool] = None,
) -> Workload:
    return Workload(
        seq_length,
        num_dimensions,
        global_batch_size,
        2 if bf16 else 4,
        bf16 if flash_attention is None else flash_attention,
    )
