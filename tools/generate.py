"""`amopo-generate` run from a repository checkout (code: megatron_amopo/cli/generate.py).

Usage: python tools/generate.py --help
"""

import sys

from megatron_amopo.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
