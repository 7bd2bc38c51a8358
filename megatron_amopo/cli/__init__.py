"""The installed commands (``amopo-*``), one module per command.

Importing any module of this package runs this file first, so the known third-party
warnings (runtime/quiet.py) are filtered here, once, before a command imports
Megatron-Core: its TE/Apex warnings fire at import time.

The pattern every command follows (and the one to follow when moving an entry point here):

- ``megatron_amopo/cli/<name>.py``, where ``amopo-<name>`` (underscores as dashes) is the
  command. Its docstring's first line is the argparse description; the rest shows usage.
- ``main(argv=None) -> int`` wrapped in ``@entry_point`` (runtime/errors.py): a user error is
  one line and its exit code. ``argv=None`` reads the process's own command line.
- It ends with ``if __name__ == "__main__": sys.exit(main())``, so ``python -m
  megatron_amopo.cli.<name>`` (and ``torchrun -m megatron_amopo.cli.<name>``) works without
  an install.
- ``[project.scripts]`` in pyproject.toml maps ``amopo-<name>`` to ``megatron_amopo.cli.<name>:main``;
  tests/unit/test_cli.py checks each entry and its ``--help``.
- The old path (``tools/<script>.py``) stays as a thin wrapper so every documented command keeps
  working: a docstring naming the command, ``from megatron_amopo.cli.<name> import main`` and
  ``if __name__ == "__main__": sys.exit(main())``. Its imports come from the installed package
  (``pip install -e .``), never from a ``sys.path`` edit.
"""

from __future__ import annotations

import os

from megatron_amopo.runtime import quiet

quiet.install()


def hide_gpus(argv: list[str] | None) -> None:
    """CPU tools: hide GPUs when running as the process's command (``argv is None``) so torch never
    sees one; a caller passing ``argv`` (tests, benchmarks) keeps its own environment."""
    if argv is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
