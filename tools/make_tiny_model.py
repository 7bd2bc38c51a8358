"""`amopo-make-tiny-model` run from a repository checkout (code: megatron_amopo/cli/make_tiny_model.py).

Usage: python tools/make_tiny_model.py --help
"""

import sys

from megatron_amopo.cli.make_tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
