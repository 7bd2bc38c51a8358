"""`amopo-export-hf` run from a repository checkout (code: megatron_amopo/cli/export_hf.py).

Usage: python tools/convert_megatron_to_hf.py --help
"""

import sys

from megatron_amopo.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
