"""``python -m x2jax.models --table``: parameter count of every registered model (markdown)."""

from __future__ import annotations

import argparse
import sys

from x2jax.models.registry import NAMES, get_model, count_params
from x2jax.models.vit import vit_grid


def table(embedding_size: int = 512) -> str:
    rows = ["| name | blocks per stage | stage widths | image | embedding | parameters |",
            "| --- | --- | --- | --- | --- | ---: |"]
    vits = [n for n in NAMES if n.startswith("vit_")]
    for name in NAMES:
        if name in vits:
            continue
        size = 32 if name.endswith("_tiny") else 112
        module = get_model(name, embedding_size=embedding_size, image_size=size)
        blocks = getattr(module, "layers", None) or getattr(module, "blocks")
        widths = getattr(module, "widths", None)
        if widths is None:  # MobileFaceNet: 64 * scale, then 128 * scale channels
            widths = (64 * module.scale, 128 * module.scale)
        widths = "/".join(map(str, widths))
        rows.append(f"| {name} | {tuple(blocks)} | {widths} | {size} | {embedding_size} | "
                    f"{count_params(module):,} |")
    rows += ["", "| name | width | depth | heads | patch, crop | tokens | drop path | mask ratio | image | "
             "embedding | parameters |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: |"]
    for name in vits:
        size = 32 if name.endswith("_tiny") else 112
        m = get_model(name, embedding_size=embedding_size, image_size=size)
        grid = vit_grid(size, m.patch_size, m.crop)
        rows.append(f"| {name} | {m.embed_dim} | {m.depth} | {m.num_heads} | {m.patch_size}, {m.crop} | "
                    f"{grid}x{grid} | {m.drop_path_rate:g} | {m.mask_ratio:g} | {size} | {embedding_size} | "
                    f"{count_params(m):,} |")
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
