"""`amopo-train`, AMoPO preference training, run from a repository checkout (code: megatron_amopo/cli/train.py).

torchrun --nproc-per-node 8 pretrain_amopo.py --load CKPT --data-path DATA ...   (--help lists the flags)
"""

import sys

from megatron_amopo.cli.train import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer re-imports this script
    sys.exit(main())
