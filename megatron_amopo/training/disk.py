"""Disk space for checkpoints: the pre-flight before training, stale staging directories, and a
save that fails on a full disk (one line naming the device, the sizes and the last good checkpoint).

A save writes ``ROOT/.tmp_iter_NNNNNNN`` beside the previous checkpoint and renames it when complete
(checkpoint/store.py), so the save directory needs room for one more checkpoint while the previous
one stays: the pre-flight asks for two.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Optional

from megatron_amopo.checkpoint.store import latest_iteration
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.model.memory import model_parameter_count
from megatron_amopo.runtime.comm import is_rank0
from megatron_amopo.runtime.errors import Refused, WriteFailed

GB = 1e9
_STAGING_RE = re.compile(r"^\.tmp_iter_\d{7}$")


def checkpoint_bytes(arch: ModelArch, bf16: bool) -> int:
    """Bytes of one training checkpoint: the weights, Adam's two moments and, for 16-bit weights,
    the fp32 main copy (Megatron mixed precision), each parameter once over all ranks."""
    per_param = (2 + 4 if bf16 else 4) + 8
    return model_parameter_count(arch) * per_param


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (the save directory may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    return shutil.disk_usage(_existing(path)).free


def device_of(path: str) -> str:
    """The filesystem holding ``path``: its device (from /proc/mounts) and mount point."""
    mount = _existing(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 1 and parts[1] == mount:
                    return f"{parts[0]} ({mount})"
    except OSError:
        pass
    return mount


def clean_stale_staging(root: str) -> list[str]:
    """Remove ``.tmp_iter_*`` directories a failed or killed save left in ``root`` (rank 0)."""
    if not is_rank0() or not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if _STAGING_RE.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"removed {path}: a checkpoint save that did not finish", file=sys.stderr, flush=True)
    return removed


def check_disk(arch: ModelArch, root: str, bf16: bool, refuse: bool) -> None:
    """Refuse (or, with ``refuse=False``, warn) when ``root`` has less free space than two checkpoints."""
    one = checkpoint_bytes(arch, bf16)
    need, free = 2 * one + one // 20, free_bytes(root)  # 5 %: metadata files and the estimate's error
    if free >= need:
        return
    what = (
        f"disk pre-flight: --save {root} on {device_of(root)} has {free / GB:.2f} GB free; a checkpoint takes "
        f"≈{one / GB:.2f} GB and a save needs room for a second one while the previous stays "
        f"(≈{need / GB:.2f} GB)"
    )
    if refuse:
        raise Refused(what, "free space, point --save at a larger filesystem, or pass --no-disk-check to start anyway")
    if is_rank0():
        print(f"warning: {what}; starting anyway (--no-disk-check)", file=sys.stderr, flush=True)


def _chain(exc: BaseException):
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def save_failure(exc: BaseException, arch: ModelArch, root: str, iteration: int, bf16: bool) -> Optional[WriteFailed]:
    """The one-line error for a save that failed writing, or None if ``exc`` is not about the disk.

    torch's checkpoint writer reports a full disk as an ``OSError`` (ENOSPC) or, from its C++ zip
    writer, as a ``RuntimeError`` ("unexpected pos ..."): a failure while less than one checkpoint
    is free counts as a full disk."""
    one, free = checkpoint_bytes(arch, bf16), free_bytes(root)
    oserr = next((e for e in _chain(exc) if isinstance(e, OSError)), None)
    full = (oserr is not None and oserr.errno in (errno.ENOSPC, errno.EDQUOT)) or free < one
    if not full and oserr is None:
        return None
    last = latest_iteration(root) if os.path.isdir(root) else None
    last_text = f"the last complete checkpoint is iteration {last}" if last is not None else "no checkpoint was saved"
    if full:
        what = (
            f"no space left on {device_of(root)} while saving iteration {iteration} to {root} "
            f"(needs ≈{one / GB:.2f} GB, {free / GB:.2f} GB free); {last_text}"
        )
    else:
        what = f"could not save iteration {iteration} to {root} ({oserr}); {last_text}"
    return WriteFailed(what, f"free space or use another --save, then resume with --load {root}")
