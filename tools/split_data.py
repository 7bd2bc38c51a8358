"""`amopo-split-data` run from a repository checkout (code: megatron_amopo/cli/split_data.py).

Usage: python tools/split_data.py --help
"""

import sys

from megatron_amopo.cli.split_data import main

if __name__ == "__main__":
    sys.exit(main())
