"""The checkpoint directory format shared by training, evaluation and conversion (see store.py)."""
