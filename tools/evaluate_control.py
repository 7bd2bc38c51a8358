"""`amopo-evaluate-control` run from a repository checkout (code: megatron_amopo/cli/evaluate_control.py).

Usage: python tools/evaluate_control.py --help
"""

import sys

from megatron_amopo.cli.evaluate_control import main

if __name__ == "__main__":
    sys.exit(main())
