"""`amopo-import-hf` run from a repository checkout (code: megatron_amopo/cli/import_hf.py).

Usage: python tools/convert_hf_to_megatron.py --help
"""

import sys

from megatron_amopo.cli.import_hf import main

if __name__ == "__main__":
    sys.exit(main())
