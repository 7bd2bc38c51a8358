"""`amopo-plot-metrics` run from a repository checkout (code: megatron_amopo/cli/plot_metrics.py).

Usage: python tools/plot_metrics.py --help
"""

import sys

from megatron_amopo.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
