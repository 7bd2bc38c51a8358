"""`amopo-import-gguf` run from a repository checkout (code: megatron_amopo/cli/import_gguf.py).

Usage: python tools/import_gguf.py --help
"""

import sys

from megatron_amopo.cli.import_gguf import main

if __name__ == "__main__":
    sys.exit(main())
