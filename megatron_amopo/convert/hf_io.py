"""Hugging Face weight files: a lazy reader and a streaming sharded safetensors writer.

The reader learns names, shapes and dtypes from file headers only and reads one
tensor at a time (each safetensors file is opened per read, so no mapping of a
whole shard stays resident). The writer computes every header up front from a
plan and then writes tensors one by one, so it never holds more than one produced
tensor. File format: 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``, then the bytes
(the safetensors specification, github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_amopo.runtime.errors import CorruptFile

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class HFWeights:
    """Names, shapes and dtypes of a HF checkpoint's tensors, and one-at-a-time reads."""

    def __init__(self, path: str):
        self.path = path
        self.kind, files, self.weight_map = self._find_files(path)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, Optional[torch.dtype]] = {}  # None: a safetensors dtype not in _ST_DTYPES
        self._bin_cache: tuple[Optional[str], dict] = (None, {})
        for file in files:
            self._read_header(file)
        for name, file in self.weight_map.items():
            if name not in self.shapes:
                raise ValueError(f"{self.path}: the index names tensor {name} in {file}, which does not hold it")

    @staticmethod
    def _find_files(path: str) -> tuple[str, list[str], dict[str, str]]:
        """(format, weight files, tensor name -> file from the index; empty for a single file)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no Hugging Face model directory at {path}")
        for index, kind in ((ST_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if os.path.isfile(os.path.join(path, index)):
                with open(os.path.join(path, index)) as fh:
                    weight_map = json.load(fh)["weight_map"]
                missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
                if missing:
                    raise FileNotFoundError(f"{path}: shard(s) named in {index} are missing: {', '.join(missing)}")
                return kind, sorted(set(weight_map.values())), dict(weight_map)
        for single, kind in ((ST_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
            if os.path.isfile(os.path.join(path, single)):
                return kind, [single], {}  # names filled in from the header
        raise FileNotFoundError(f"no weights in {path}: expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")

    def _read_header(self, file: str) -> None:
        full = os.path.join(self.path, file)
        if self.kind == "safetensors":
            from safetensors import safe_open

            check_safetensors(full)
            try:
                with safe_open(full, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        sl = f.get_slice(name)
                        self.shapes[name] = tuple(sl.get_shape())
                        self.dtypes[name] = _ST_DTYPES.get(sl.get_dtype())
                        self.weight_map.setdefault(name, file)
            except Exception as e:  # safetensors raises its own SafetensorError for damaged files
                raise _corrupt(full, f"{type(e).__name__}: {e}") from e
        else:
            for name, t in self._load_bin(file).items():
                self.shapes[name], self.dtypes[name] = tuple(t.shape), t.dtype
                self.weight_map.setdefault(name, file)

    def _load_bin(self, file: str) -> dict:
        # Memory-mapped and weights_only: nothing is executed, pages are read on use.
        if self._bin_cache[0] != file:
            self._bin_cache = (None, {})
            full = os.path.join(self.path, file)
            try:
                state = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, EOFError, ValueError, OSError) as e:  # a truncated zip or pickle
                raise _corrupt(full, f"{type(e).__name__}: {e}") from e
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if self.kind == "bin":
            return self._load_bin(file)[name]
        from safetensors import safe_open

        with safe_open(os.path.join(self.path, file), framework="pt") as f:
            return f.get_tensor(name)


def _corrupt(path: str, what: str) -> CorruptFile:
    return CorruptFile(
        f"{path} is truncated or corrupt ({what}); nothing was written",
        "download or export the model again (compare the file's size with the source)",
    )


def check_safetensors(path: str) -> None:
    """The safetensors header parses and its tensors end exactly at the end of the file."""
    size = os.path.getsize(path)
    if size < 8:
        raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise _corrupt(path, f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"the header is not valid JSON: {e}") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise _corrupt(path, f"the header describes {expected} bytes, the file has {size}")


# ---------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20 (Hugging Face's max_shard_size convention)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def assign_shards(plan: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, in plan order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # tensor data 8-byte aligned


def _write_file(path: str, tensors: list[PlannedTensor], produce: Callable[[str], torch.Tensor]) -> None:
    header = _header(tensors)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for t in tensors:
            value = produce(t.name)
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise RuntimeError(
                    f"{t.name}: produced {tuple(value.shape)} {value.dtype}, planned {t.shape} {t.dtype}"
                )
            fh.write(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_sharded_safetensors(
    out_dir: str, plan: Iterable[PlannedTensor], produce: Callable[[str], torch.Tensor], max_bytes: int
) -> list[str]:
    """Write ``plan`` as ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index."""
    plan = list(plan)
    shards = assign_shards(plan, max_bytes)
    n = len(shards)
    names = [ST_SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for name, tensors in zip(names, shards):
        _write_file(os.path.join(out_dir, name), tensors, produce)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan)},
            "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors},
        }
        with open(os.path.join(out_dir, ST_INDEX), "w") as fh:
            json.dump(index, fh, indent=2)
    return names
