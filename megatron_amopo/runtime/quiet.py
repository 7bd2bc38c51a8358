"""A quiet console: the known, harmless third-party warnings our entry points would print.

``install()`` runs on import of megatron_amopo/cli/ (every installed command), before anything
imports Megatron-Core, and first in pretrain_amopo.py and tools/evaluate.py. It
filters exactly the entries of ``KNOWN`` (module, message, why it is harmless);
``AMOPO_SHOW_WARNINGS=1`` shows them all again. Our own and unknown warnings still
print, prefixed with the rank when several ranks run (torchrun merges their output).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

SHOW_ENV = "AMOPO_SHOW_WARNINGS"


@dataclass(frozen=True)
class Known:
    """One harmless ``warnings`` warning: where it comes from, what it says, why we hide it."""

    module: str  # regex on the warning's module
    message: str  # regex matched at the start of the message
    reason: str
    category: type = UserWarning
    cpu_only: bool = False  # advice that matters on GPU: filtered only when CUDA is absent


KNOWN: tuple[Known, ...] = (
    Known(
        r"megatron\.core\.",
        r"Transformer Engine and Apex are not installed",
        "CPU and TE-less builds use Megatron-Core's torch fallbacks on purpose (model/provider.py picks the spec)",
    ),
    Known(
        r"megatron\.core\.",
        r"Apex is not installed\. Falling back to Torch Norm",
        "the local spec's torch RMSNorm is the norm we choose without TE",
    ),
    Known(
        r"megatron\.core\.transformer\.transformer_config",
        r"full scope is deprecated",
        "Megatron-Core 0.16 warns about its own default cuda_graph_scope; we build no CUDA graphs",
    ),
    Known(
        r"megatron\.core\.dist_checkpointing\.",
        r"`load_state_dict` is deprecated",
        "Megatron-Core 0.16's dist_checkpointing calls torch.distributed.checkpoint's old name",
        FutureWarning,
    ),
    Known(
        r"",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "dist_checkpointing's torch strategy builds ShardedTensors (raised through cpu_compat's function mode)",
        FutureWarning,
    ),
    Known(
        r"megatron\.core\.tensor_parallel\.layers",
        r"When using async grad allreduce",
        "CUDA_DEVICE_MAX_CONNECTIONS orders CUDA streams; there are none on CPU",
        cpu_only=True,
    ),
)


_INSTALLED = False


def showing_all() -> bool:
    return os.environ.get(SHOW_ENV, "") not in ("", "0")


def install() -> None:
    """Filter the ``KNOWN`` messages (unless AMOPO_SHOW_WARNINGS is set) and rank-prefix the rest."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _prefix_rank()
    if showing_all():
        return
    cuda = _cuda_available()
    for k in KNOWN:
        if not (k.cpu_only and cuda):
            warnings.filterwarnings("ignore", message=k.message, category=k.category, module=k.module)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _prefix_rank() -> None:
    """Under torchrun with several ranks, each warning line starts with ``[rank N]``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    tag, plain = f"[rank {os.environ.get('RANK', '?')}] ", warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        return "".join(tag + part for part in plain(message, category, filename, lineno, line).splitlines(True))

    warnings.formatwarning = formatwarning
