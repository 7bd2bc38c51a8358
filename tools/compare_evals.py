"""`amopo-compare-evals` run from a repository checkout (code: megatron_amopo/cli/compare_evals.py).

Usage: python tools/compare_evals.py --help
"""

import sys

from megatron_amopo.cli.compare_evals import main

if __name__ == "__main__":
    sys.exit(main())
