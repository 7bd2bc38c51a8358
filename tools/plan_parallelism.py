"""`amopo-plan-parallelism` run from a repository checkout (code: megatron_amopo/cli/plan_parallelism.py).

Usage: python tools/plan_parallelism.py --help
"""

import sys

from megatron_amopo.cli.plan_parallelism import main

if __name__ == "__main__":
    sys.exit(main())
