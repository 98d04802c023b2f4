"""``python -m x2jax.models --table``: parameter count of every registered model (markdown)."""

from __future__ import annotations

import argparse
import sys

from x2jax.models.registry import NAMES, get_model, count_params


def table(embedding_size: int = 512) -> str:
    rows = ["| name | blocks per stage | stage widths | image | embedding | parameters |",
            "| --- | --- | --- | --- | --- | ---: |"]
    for name in NAMES:
        size = 32 if name.endswith("_tiny") else 112
        module = get_model(name, embedding_size=embedding_size, image_size=size)
        blocks = getattr(module, "layers", None) or getattr(module, "blocks")
        widths = getattr(module, "widths", None)
        if widths is None:  # MobileFaceNet: 64 * scale, then 128 * scale channels
            widths = (64 * module.scale, 128 * module.scale)
        widths = "/".join(map(str, widths))
        rows.append(f"| {name} | {tuple(blocks)} | {widths} | {size} | {embedding_size} | "
                    f"{count_params(module):,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x2jax.models")
    parser.add_argument("--table", action="store_true", help="print the parameter-count table")
    parser.add_argument("--embedding-size", type=int, default=512)
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 0
    print(table(args.embedding_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
