import os

# Megatron-Core and torch spawn many threads per process; the CI machine has 2 cores
# and multi-rank tests run up to 4 processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
