"""Configuration dataclasses, one per concern, and the flags generated from them.

Every field has a default and a one-line ``help`` in its metadata; validation that
can be done without a model or process group lives in ``__post_init__`` and raises
``ValueError`` naming the flag and the fix. ``add_dataclass_args`` builds argparse
flags from the fields (``beta`` -> ``--amopo-beta`` for ``AmopoConfig`` with the
prefix ``amopo``); YAML files map onto the same field names (see ``load_yaml``).
A choice is a ``Literal`` field: its values become the flag's ``choices``, and
``check_choices`` refuses the others from YAML or code.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

LossType = Literal["simpo", "orpo"]
Weighting = Literal["gaussian", "gaussian-inverse", "mean", "equal", "fixed"]
OutputLayer = Literal["logits", "fused"]
PairReduction = Literal["sum", "mean"]
BatchLayout = Literal["packed", "padded"]
RecomputeGranularity = Literal["full", "selective"]
LrDecayStyle = Literal["constant", "linear", "cosine"]
DistributedBackend = Literal["nccl", "gloo"]


def config_field(default: Any, help: str, flag: Optional[str] = None, **kw) -> Any:
    """A dataclass field with a help line (and optionally an explicit flag name)."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_f = config_field  # the short name of the field tables below (and in data/config.py)


@dataclass
class AmopoConfig:
    """The AMoPO objective (paper Eq. for SimPO/ORPO pair losses and Gaussian weights)."""

    loss_type: LossType = _f("simpo", "pair loss: simpo or orpo", flag="--amopo-loss")
    beta: float = _f(0.8, "SimPO reward scale beta (ORPO: weight of the odds-ratio term)")
    gamma: float = _f(2.0, "SimPO target reward margin gamma (unused by ORPO)")
    weighting: Weighting = _f(
        "gaussian",
        "pair weighting: gaussian (softmax of sampled r_k, published code), gaussian-inverse "
        "(softmax of -r_k, paper text), mean (softmax of mu_c+mu_r), equal, fixed",
    )
    fixed_weights: Optional[list[float]] = _f(
        None, "per-pair weights for --amopo-weighting fixed (P values, general pair first); normalised"
    )
    sft_weight: float = _f(0.0, "weight lambda_sft of the mean length-normalised NLL of chosen responses")
    pair_reduction: PairReduction = _f(
        "sum",
        "sum: a sample's loss is sum_k w_k L_k (paper formula); mean: divided by its number of valid pairs, "
        "the published code's scale at per-device batch 1 (P times smaller; docs/OBJECTIVE.md)",
    )
    seed: int = _f(1234, "seed of the counter-based Gaussian draws (independent of the parallel layout)")
    output_layer: OutputLayer = _f(
        "logits",
        "logits: the model's output layer forms [tokens, V/TP] logits; fused: the log-prob pass forms "
        "them chunk by chunk from the final hidden states, never all at once (docs/DESIGN.md)",
    )

    def __post_init__(self) -> None:
        check_choices(self, "amopo")
        if self.beta <= 0:
            raise ValueError(f"--amopo-beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"--amopo-sft-weight must be >= 0, got {self.sft_weight}")
        if self.weighting == "fixed":
            if not self.fixed_weights:
                raise ValueError("--amopo-weighting fixed needs --amopo-fixed-weights (one value per pair)")
            if any(w < 0 for w in self.fixed_weights) or sum(self.fixed_weights) <= 0:
                raise ValueError(
                    f"--amopo-fixed-weights must be non-negative with a positive sum, got {self.fixed_weights}"
                )
        elif self.fixed_weights is not None:
            raise ValueError("--amopo-fixed-weights is only used with --amopo-weighting fixed")


# ---------------------------------------------------------------------------
# Flag generation


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; any other type -> ``(type, False)``."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def check_choices(cfg: Any, prefix: Optional[str] = None) -> None:
    """Refuse a ``Literal`` field's value outside its choices, naming the flag.

    argparse refuses a bad flag value itself (``choices``); this covers YAML run files and
    configs built in code. Called first in ``__post_init__``, before the value is used.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, optional = unwrap_optional(hints[f.name])
        value = getattr(cfg, f.name)
        if typing.get_origin(tp) is not Literal or (optional and value is None):
            continue
        if value not in typing.get_args(tp):
            raise ValueError(f"{flag_name(f, prefix)} must be one of {typing.get_args(tp)}, got {value!r}")


def flag_name(f: dataclasses.Field, prefix: Optional[str]) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--{prefix}-{name}" if prefix else f"--{name}"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: Optional[str] = None):
    """Add one flag per field of ``cls`` as an option group (returned); defaults are left as ``None``
    so that ``dataclass_from_args`` can tell flags given on the command line from defaults."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = unwrap_optional(hints[f.name])
        kw: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": None, "help": f.metadata.get("help")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw.update(type=str, choices=typing.get_args(tp))  # --help and usage list them: {a,b,c}
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            kw.update(type=inner, nargs="+", metavar=f.name.upper())
        else:
            kw.update(type=tp, metavar=f.name.upper())
        group.add_argument(flag_name(f, prefix), **kw)
    return group


def _yaml_key(f: dataclasses.Field, prefix: Optional[str]) -> str:
    return flag_name(f, prefix).lstrip("-").replace("-", "_")


def dataclass_from_args(
    cls: type, args: argparse.Namespace, prefix: Optional[str] = None, yaml_values: Optional[dict] = None
):
    """Build ``cls`` from YAML values overridden by flags given on the command line.

    YAML keys are the flag names without dashes (``--amopo-beta`` -> ``amopo_beta``);
    the keys this class uses are removed from ``yaml_values``.
    """
    values = {}
    for f in dataclasses.fields(cls):
        key = _yaml_key(f, prefix)
        if yaml_values is not None and key in yaml_values:
            values[f.name] = yaml_values.pop(key)
        v = getattr(args, f"{cls.__name__}.{f.name}", None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def load_yaml(path: str) -> dict:
    """Read a YAML run file: a flat mapping whose keys are flag names without dashes."""
    import yaml

    from megatron_amopo.runtime.errors import InputError

    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise InputError(
                f"--config {path} is not valid YAML ({' '.join(str(err).split())})", "fix the file"
            ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run file must be a mapping of flag names to values, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


@dataclass
class ParallelConfig:
    """Parallel layout (Megatron-Core model parallelism); DP size is what is left of the world."""

    tensor_model_parallel_size: int = _f(1, "tensor-parallel size (divides heads, query groups and vocab)")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size (at most the number of layers)")
    context_parallel_size: int = _f(1, "context-parallel size (needs Transformer Engine attention on GPU)")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tensor-parallel size > 1)")
    distributed_backend: Optional[DistributedBackend] = _f(
        None, "torch.distributed backend: nccl (with gloo for CPU tensors; the default with CUDA) or gloo"
    )
    distributed_timeout_minutes: int = _f(10, "timeout of collective operations, in minutes")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence over the "
                "tensor-parallel group); drop --sequence-parallel or raise the TP size"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP x CP = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} x {self.context_parallel_size} = {self.model_parallel_size}; "
                f"launch a multiple of {self.model_parallel_size} processes or change the layout"
            )
        return world_size // self.model_parallel_size


@dataclass
class TrainingConfig:
    """Batching, schedule length and precision of a training run (Megatron flag names)."""

    micro_batch_size: Optional[int] = _f(None, "groups (samples) per micro-batch; or give --micro-batch-tokens")
    micro_batch_tokens: Optional[int] = _f(
        None, "token budget per micro-batch (padded: sequences x longest; packed: sum of lengths)"
    )
    global_batch_size: int = _f(
        8,
        "groups per optimizer step over all data-parallel ranks (approximate with "
        "--micro-batch-tokens: it sets the number of micro-batches per step)",
    )
    train_iters: Optional[int] = _f(None, "optimizer steps to train; or give --train-epochs")
    train_epochs: Optional[int] = _f(None, "epochs over the training groups (converted to steps)")
    seq_length: int = _f(1024, "row length S of a micro-batch (packed rows hold several sequences)")
    batch_layout: BatchLayout = _f(
        "packed", "micro-batch layout: packed (block-diagonal rows) or padded (one sequence per row)"
    )
    plan_window: int = _f(512, "groups per length-grouping window of the micro-batch planner")
    seed: int = _f(1234, "seed of data order, initialisation and dropout")
    bf16: bool = _f(False, "bf16 parameters and compute (GPU); fp32 otherwise")
    recompute_granularity: Optional[RecomputeGranularity] = _f(
        None, "activation recomputation: full or selective (GPU)"
    )
    use_distributed_optimizer: bool = _f(False, "shard optimizer state over data-parallel ranks")
    eval_interval: Optional[int] = _f(None, "evaluate on the validation split every N steps (and at the end)")
    eval_batches: Optional[int] = _f(None, "micro-batches per evaluation per rank (default: the whole split)")
    log_interval: int = _f(1, "print a log line every N steps")
    exit_interval: Optional[int] = _f(
        None,
        "save and exit after every N-th step of this launch's schedule "
        "(step count divisible by N), e.g. to split a run into jobs",
    )
    exit_on_nan: bool = _f(True, "stop (without saving) when the loss is not finite")
    memory_check: bool = _f(
        True,
        "refuse to start when the memory pre-flight estimates that a rank will not fit "
        "(--no-memory-check starts anyway)",
    )
    num_workers: int = _f(
        1,
        "DataLoader worker processes per rank that build micro-batches ahead of the step (into pinned "
        "memory on a GPU); 0 builds them on the main thread",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if (self.micro_batch_size is None) == (self.micro_batch_tokens is None):
            raise ValueError("give exactly one of --micro-batch-size (groups) or --micro-batch-tokens")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("give exactly one of --train-iters or --train-epochs")
        for name in ("global_batch_size", "seq_length", "log_interval", "plan_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def microbatches_per_step(self, data_parallel_size: int, mean_groups_per_microbatch: float = 0.0) -> int:
        """Micro-batches each DP rank runs per optimizer step."""
        if self.micro_batch_size is not None:
            per_step = self.micro_batch_size * data_parallel_size
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size x DP = "
                    f"{self.micro_batch_size} x {data_parallel_size}; use a multiple of {per_step}"
                )
            return self.global_batch_size // per_step
        return max(1, round(self.global_batch_size / (data_parallel_size * max(mean_groups_per_microbatch, 1e-9))))


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule (Megatron's OptimizerParamScheduler)."""

    lr: float = _f(3e-7, "peak learning rate (AMoPO paper: 3e-7 for 7B models)")
    min_lr: float = _f(0.0, "learning rate at the end of the decay")
    lr_decay_style: LrDecayStyle = _f("cosine", "constant, linear or cosine")
    lr_warmup_fraction: float = _f(0.1, "fraction of the steps spent in linear warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this value (0 disables)")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")


@dataclass
class CheckpointConfig:
    """Where the model comes from and where checkpoints go."""

    load: Optional[str] = _f(None, "checkpoint root to start from (a converted HF model or a training run)")
    save: Optional[str] = _f(None, "checkpoint root to save to (may equal --load to resume in place)")
    save_interval: Optional[int] = _f(None, "save every N steps (also at the end and on SIGTERM/SIGUSR1)")
    keep_last: Optional[int] = _f(None, "keep only the newest K training checkpoints under --save")
    finetune: bool = _f(False, "take only the weights from --load (start at step 0 with fresh optimizer)")
    disk_check: bool = _f(
        True,
        "refuse to start when --save has less free space than two checkpoints (one and the staging copy of "
        "the next); --no-disk-check warns and starts anyway",
    )

    def __post_init__(self) -> None:
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1, got {self.keep_last}")


@dataclass
class TrainDataConfig:
    """Preprocessed datasets (tools/preprocess_data.py output) used by a run."""

    data_path: Optional[str] = _f(None, "training dataset directory")
    valid_data_path: Optional[str] = _f(None, "validation dataset directory (or use --split)")
    split: Optional[str] = _f(None, "train,valid percentages of --data-path's groups, e.g. 95,5")
    dimensions: Optional[list[str]] = _f(None, "expected dimensions, in order (checked against the dataset)")
    run_dir: Optional[str] = _f(
        None, "where metrics, TensorBoard events and the resolved config go (default: --save, else ./runs/<time>)"
    )

    def __post_init__(self) -> None:
        if self.valid_data_path and self.split:
            raise ValueError("give --valid-data-path or --split, not both")
        if self.split is not None:
            self.split_fractions()

    def split_fractions(self) -> tuple[float, float]:
        try:
            parts = [float(x) for x in str(self.split).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 2 or min(parts) < 0 or sum(parts) <= 0:
            raise ValueError(f"--split must be two non-negative numbers like 95,5, got {self.split!r}")
        total = sum(parts)
        return parts[0] / total, parts[1] / total


@dataclass
class LoggingConfig:
    """Weights & Biases logging beside TensorBoard and metrics.jsonl (Megatron-LM's flag names)."""

    wandb_project: Optional[str] = _f(
        None, "also log to this W&B project (rank 0; pip install -e '.[wandb]'; WANDB_MODE=offline works)"
    )
    wandb_exp_name: Optional[str] = _f(None, "W&B run name (default: the run directory's name)")
    wandb_save_dir: Optional[str] = _f(None, "directory for W&B's local files (default: the run directory)")

    def __post_init__(self) -> None:
        if self.wandb_project is None:
            given = [n for n in ("wandb_exp_name", "wandb_save_dir") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} needs --wandb-project (the W&B project to log to)")
            return
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "--wandb-project needs the wandb package, which is not installed: "
                "pip install -e '.[wandb]' (or drop --wandb-project)"
            )


@dataclass
class ProfileConfig:
    """Profiling chosen steps: torch profiler traces, and nsys capture ranges on GPU (Megatron-LM's names)."""

    profile: bool = _f(
        False,
        "profile steps --profile-step-start..--profile-step-end on --profile-ranks: a torch profiler "
        "trace under RUN_DIR/profile; on GPU also cudaProfilerStart/Stop and NVTX step ranges for nsys",
    )
    profile_step_start: int = _f(10, "first profiled step (1-based, as in the log lines)")
    profile_step_end: int = _f(12, "last profiled step (inclusive)")
    profile_ranks: list[int] = _f([0], "global ranks to profile")
    profile_record_shapes: bool = _f(False, "record operator input shapes in the torch profiler trace")

    def __post_init__(self) -> None:
        if self.profile_step_start < 1 or self.profile_step_end < self.profile_step_start:
            raise ValueError(
                f"need 1 <= --profile-step-start <= --profile-step-end, got {self.profile_step_start} and "
                f"{self.profile_step_end}"
            )
        if not self.profile_ranks or min(self.profile_ranks) < 0:
            raise ValueError(f"--profile-ranks must list global ranks >= 0, got {self.profile_ranks}")


# ---------------------------------------------------------------------------
# The whole run

RUN_SECTIONS = {  # section name -> (dataclass, flag prefix)
    "parallel": (ParallelConfig, None),
    "training": (TrainingConfig, None),
    "optimizer": (OptimizerConfig, None),
    "checkpoint": (CheckpointConfig, None),
    "data": (TrainDataConfig, None),
    "amopo": (AmopoConfig, "amopo"),
    "logging": (LoggingConfig, None),
    "profile": (ProfileConfig, None),
}


@dataclass
class RunConfig:
    """Everything pretrain_amopo.py needs, one dataclass per concern."""

    parallel: ParallelConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    data: TrainDataConfig
    amopo: AmopoConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_arg_parser(description: str = "") -> argparse.ArgumentParser:
    from megatron_amopo.runtime.errors import ArgumentParser

    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML run file (keys: flag names without dashes); flags given on the command line override it",
    )
    for cls, prefix in RUN_SECTIONS.values():
        add_dataclass_args(parser, cls, prefix)
    return parser


@dataclass
class DryRunConfig:
    """pretrain_amopo.py --dry-run: build one rank's shard on the meta device and print its memory estimate."""

    world_size: Optional[int] = _f(None, "number of GPUs of the target run (default: TP x PP x CP, i.e. DP 1)")
    rank: str = _f("0", "global rank to build, or 'all'")
    hf_config: Optional[str] = _f(None, "Hugging Face config.json (file or model directory); or give --load")
    num_dimensions: Optional[int] = _f(None, "dimensions D of the data (default: len(--dimensions), else 3)")
    gpu_memory_gib: float = _f(80.0, "memory of one GPU")
    reserve_gib: float = _f(6.0, "left for CUDA context, NCCL, fragmentation")
    json: Optional[str] = _f(None, "also write the report (with every parameter's shape) here")


DRY_RUN_USES = (
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--context-parallel-size",
    "--sequence-parallel",
    "--micro-batch-size",
    "--micro-batch-tokens",
    "--global-batch-size",
    "--seq-length",
    "--bf16",
    "--recompute-granularity",
    "--use-distributed-optimizer",
    "--load",
    "--dimensions",
)


def add_dry_run_args(parser: argparse.ArgumentParser) -> None:
    """``--dry-run`` and its options, as one option group of ``parser``."""
    group = add_dataclass_args(parser, DryRunConfig)
    group.title = "dry run (pretrain_amopo.py --dry-run --help)"
    group.description = (
        "build one rank's shard on the meta device, no GPUs or peers, and print its memory "
        "estimate; of the training flags it uses " + ", ".join(DRY_RUN_USES)
    )
    group.add_argument("--dry-run", action="store_true", help="do a dry run instead of training")


def schedule_unused(args: argparse.Namespace) -> None:
    """For tools that do not train: without --train-iters or --train-epochs the schedule is one step."""
    if (
        getattr(args, "TrainingConfig.train_iters", None) is None
        and getattr(args, "TrainingConfig.train_epochs", None) is None
    ):
        setattr(args, "TrainingConfig.train_iters", 1)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    yaml_values = load_yaml(args.config) if args.config else {}
    sections = {
        name: dataclass_from_args(cls, args, prefix, yaml_values) for name, (cls, prefix) in RUN_SECTIONS.items()
    }
    if yaml_values:
        raise ValueError(f"{args.config}: unknown keys {sorted(yaml_values)} (keys are flag names without dashes)")
    return RunConfig(**sections)
