"""Whether two runs logged the same metrics, bit for bit, except for times.

    python scripts/same_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl
    python scripts/same_metrics.py --common-keys A B   # ignore keys only one side has

Compares every field of every line of two ``metrics.jsonl`` files but ``time``
and ``images_per_second`` (floats are compared as their JSON text, i.e. exactly).
With ``--common-keys``, a key that one line has and the other lacks (a metric
added since) is left out; the keys both have must still agree bit for bit.
Prints the first difference and exits 1, or prints the line count and exits 0.
"""

from __future__ import annotations

import json
import sys

TIMES = ("time", "images_per_second")


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in f if line.strip()]


def main(argv: list[str]) -> int:
    common = "--common-keys" in argv
    argv = [a for a in argv if a != "--common-keys"]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = records(argv[0]), records(argv[1])
    skipped: set[str] = set()
    for i, (x, y) in enumerate(zip(a, b)):
        if common:
            skipped |= set(x) ^ set(y)
            x, y = ({k: v for k, v in r.items() if k in x and k in y} for r in (x, y))
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            print(f"line {i + 1} differs in {keys}: {[x.get(k) for k in keys]} vs {[y.get(k) for k in keys]}")
            return 1
    if len(a) != len(b):
        print(f"{len(a)} lines vs {len(b)} lines")
        return 1
    left_out = f" (left out, on one side only: {', '.join(sorted(skipped))})" if skipped else ""
    print(f"same: {len(a)} lines, every field but {', '.join(TIMES)} bit for bit{left_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
