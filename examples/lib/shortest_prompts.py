"""Keep the N prompts of a HelpSteer2 row file with the fewest characters (prompt + longest response).

    python examples/lib/shortest_prompts.py IN.jsonl OUT.jsonl N

All rows of a kept prompt are kept, in input order, so a file split by prompt stays split by prompt.
Used by the CPU demo to fit its time budget with little truncation.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(src: str, dst: str, n: int) -> None:
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    size: dict[str, int] = defaultdict(int)
    for r in rows:
        size[r["prompt"]] = max(size[r["prompt"]], len(r["prompt"]) + len(r["response"]))
    keep = set(sorted(size, key=lambda p: (size[p], p))[:n])
    with open(dst, "w", encoding="utf-8") as fh:
        for r in rows:
            if r["prompt"] in keep:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{dst}: {len(keep)} of {len(size)} prompts")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
