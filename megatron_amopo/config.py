"""Configuration dataclasses, one per concern, and the flags generated from them.

Every field has a default and a one-line ``help`` in its metadata; validation that
can be done without a model or process group lives in ``__post_init__`` and raises
``ValueError`` naming the flag and the fix. ``add_dataclass_args`` builds argparse
flags from the fields (``beta`` -> ``--amopo-beta`` for ``AmopoConfig`` with the
prefix ``amopo``); YAML files map onto the same field names (see ``load_yaml``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

LOSS_TYPES = ("simpo", "orpo")
WEIGHTINGS = ("gaussian", "gaussian-inverse", "mean", "equal", "fixed")


def _f(default: Any, help: str, flag: Optional[str] = None, **kw) -> Any:
    """A dataclass field with a help line (and optionally an explicit flag name)."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class AmopoConfig:
    """The AMoPO objective (paper Eq. for SimPO/ORPO pair losses and Gaussian weights)."""

    loss_type: str = _f("simpo", "pair loss: simpo or orpo", flag="--amopo-loss")
    beta: float = _f(0.8, "SimPO reward scale beta (ORPO: weight of the odds-ratio term)")
    gamma: float = _f(2.0, "SimPO target reward margin gamma (unused by ORPO)")
    weighting: str = _f(
        "gaussian",
        "pair weighting: gaussian (softmax of sampled r_k, published code), gaussian-inverse "
        "(softmax of -r_k, paper text), mean (softmax of mu_c+mu_r), equal, fixed",
    )
    fixed_weights: Optional[list[float]] = _f(
        None, "per-pair weights for --amopo-weighting fixed (P values, general pair first); normalised"
    )
    sft_weight: float = _f(0.0, "weight lambda_sft of the mean length-normalised NLL of chosen responses")
    seed: int = _f(1234, "seed of the counter-based Gaussian draws (independent of the parallel layout)")

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--amopo-loss must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--amopo-weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
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


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flag_name(f: dataclasses.Field, prefix: Optional[str]) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--{prefix}-{name}" if prefix else f"--{name}"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: Optional[str] = None) -> None:
    """Add one flag per field of ``cls``; defaults are left as ``None`` so that
    ``dataclass_from_args`` can tell flags given on the command line from defaults."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        kw: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": None, "help": f.metadata.get("help")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp)
            kw.update(type=inner, nargs="+")
        else:
            kw["type"] = tp
        group.add_argument(flag_name(f, prefix), **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Optional[dict] = None):
    """Build ``cls`` from YAML values ``base`` overridden by flags given on the command line."""
    values = dict(base or {})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config file: {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        v = getattr(args, f"{cls.__name__}.{f.name}", None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def load_yaml(path: str) -> dict:
    """Read a YAML run file: top-level sections named after the config dataclasses' sections."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run file must be a mapping of sections, got {type(data).__name__}")
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
    distributed_backend: Optional[str] = _f(None, "torch.distributed backend; default nccl with CUDA, gloo without")
    distributed_timeout_minutes: int = _f(10, "timeout of collective operations, in minutes")

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence over the "
                "tensor-parallel group); drop --sequence-parallel or raise the TP size"
            )
        if self.distributed_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"--distributed-backend must be nccl or gloo, got {self.distributed_backend!r}")

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
