import os

import pytest

# Megatron-Core and torch spawn many threads per process; the CI machine has 2 cores
# and multi-rank tests run up to 4 processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny Qwen2 (shrunk real Qwen2 tokenizer) converted by the real tool, and real HelpSteer2 rows
    preprocessed by the real tool, built once for every test that trains or evaluates it
    (``megatron_amopo.testing.pipeline.tiny_training_root``). Tests write only below it, under names
    of their own, and never into ``init`` or ``data``."""
    from megatron_amopo.testing.pipeline import tiny_training_root

    return tiny_training_root(tmp_path_factory.mktemp("tiny_run"))
