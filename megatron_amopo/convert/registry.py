"""model_type -> mapping table."""

from __future__ import annotations

from megatron_amopo.convert import llama, mistral, qwen2
from megatron_amopo.convert.common import Row
from megatron_amopo.model.architectures import SUPPORTED_MODEL_TYPES

TABLES: dict[str, tuple[Row, ...]] = {"qwen2": qwen2.TABLE, "llama": llama.TABLE, "mistral": mistral.TABLE}
assert set(TABLES) == set(SUPPORTED_MODEL_TYPES)


def table_for(model_type: str) -> tuple[Row, ...]:
    if model_type not in TABLES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(TABLES))}")
    return TABLES[model_type]
