"""`amopo-preprocess` run from a repository checkout (code: megatron_amopo/cli/preprocess.py).

Usage: python tools/preprocess_data.py --help
"""

import sys

from megatron_amopo.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
