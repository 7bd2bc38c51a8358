"""`amopo-evaluate` run from a repository checkout (code: megatron_amopo/cli/evaluate.py).

Usage: torchrun --nproc-per-node 2 tools/evaluate.py --help
"""

import sys

from megatron_amopo.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
