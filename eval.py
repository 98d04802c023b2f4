"""Evaluate a face-recognition checkpoint: verification pairs, IJB-B/C 1:1, exports.

    python eval.py --checkpoint DIR                              # synthetic verification set
    python eval.py --checkpoint DIR --sets lfw,cfp_fp,agedb_30 --data-dir /data/faces_emore
    python eval.py --checkpoint DIR --ijb /data/IJB_release/IJBC --ijb-target IJBC
    python eval.py --checkpoint DIR --out results.json --roc-dir roc/ --export emb.npy

Verification follows insightface's protocol (docs/evaluation.md): flip-summed
embeddings, 10 folds, thresholds arange(0, 4, 0.01). Embedding is jitted and
sharded over all local devices (batch split on a "data" mesh axis).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

SYNTHETIC = "synthetic"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="saved model dir (model.json + variables/) or train.py checkpoint")
    p.add_argument(
        "--sets",
        default=SYNTHETIC,
        help=f"comma-separated verification sets: '{SYNTHETIC}' (generated) or names of <data-dir>/<name>.bin",
    )
    p.add_argument("--data-dir", default=".", help="directory holding the .bin files")
    p.add_argument(
        "--synthetic-config",
        default=None,
        help="x2jax.data.synthetic config of the synthetic set (default: the checkpoint's info['synthetic'], else 'small')",
    )
    p.add_argument(
        "--synthetic-num-identities",
        type=int,
        default=0,
        help="data.num_identities of the training run (0 = the config's); held-out identities start after them",
    )
    p.add_argument("--resize", action="store_true", help="resize set images to the model's image size (bilinear)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (rounded up to the device count)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--ijb", default=None, help="IJB root (meta/, loose_crop/) to run the 1:1 protocol")
    p.add_argument("--ijb-target", default="IJBC", choices=("IJBB", "IJBC"))
    p.add_argument("--no-detector-score", action="store_true", help="IJB: do not weight images by detector score")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--roc-dir", default=None, help="write ROC plots (PNG) here")
    p.add_argument("--export", default=None, help="save flip-summed embeddings (.npy; one file per set: name_<set>.npy)")
    p.add_argument("--export-model", default=None, help="save the embedding function with jax.export to this file")
    p.add_argument("--dtype", default=None, help="compute dtype override (float32, bfloat16)")
    return p.parse_args(argv)


def resolve_sets(names: Sequence[str], data_dir: str) -> dict[str, str | None]:
    """name -> .bin path (None for the synthetic set); every file checked before any work."""
    sets: dict[str, str | None] = {}
    for name in names:
        if name == SYNTHETIC:
            sets[name] = None
            continue
        path = os.path.join(data_dir, f"{name}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"verification set {name!r} not found: {path} (set --data-dir)")
        sets[name] = path
    return sets


def synthetic_settings(args: argparse.Namespace, info: dict[str, Any], image_size: int) -> tuple[str, dict[str, Any]]:
    """(config name, overrides) of the synthetic set.

    A checkpoint's ``info["synthetic"]`` (``{"variant": name, <SyntheticConfig fields>}``,
    filled by the train checkpoint loader) is the default, so that eval.py sees the
    held-out identities of that run; command-line flags override it. The set is
    rendered at the model's image size (identities and pairs do not depend on it).
    """
    stored = dict(info.get("synthetic") or {})
    name = args.synthetic_config or stored.pop("variant", "small")
    overrides = stored if args.synthetic_config is None else {}
    if args.synthetic_num_identities > 0:
        overrides["num_identities"] = args.synthetic_num_identities
    overrides["image_size"] = image_size
    return name, overrides


def load_set(name: str, path: str | None, image_size: int, *, resize: bool, synthetic: tuple[str, dict[str, Any]]):
    """(images uint8 (2N, S, S, 3), issame bool (N,)), checked against the model's image size."""
    if path is None:
        from x2jax.data.synthetic import generate_verification, get_config

        images, issame = generate_verification(get_config(synthetic[0], **synthetic[1]))
    else:
        from x2jax.data.verification_bin import load_bin

        images, issame = load_bin(path, image_size=None)
    if images.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"set {name!r}: {images.shape[0]} images for {issame.shape[0]} pairs (need 2 per pair)")
    if images.shape[1:3] != (image_size, image_size):
        if not resize:
            raise ValueError(
                f"set {name!r} has {images.shape[1]}x{images.shape[2]} images but the checkpoint's model is for "
                f"{image_size}x{image_size} (model.json image_size); pass --resize to resize them"
            )
        from PIL import Image

        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR)) for im in images]
        )
    return images, issame


def data_mesh():
    """1-D mesh over all local devices with axis "data"."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.local_devices()), ("data",))


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    header = ["set", "pairs", "accuracy %", "VAL@FAR=1e-3 %", "threshold"]
    lines = [
        [
            name,
            str(r["num_pairs"]),
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
            f"{100 * r['val']:.2f} ± {100 * r['val_std']:.2f}",
            f"{r['threshold']:.3f}",
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)  # JSON has no NaN
    if isinstance(x, np.integer):
        return int(x)
    return x


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, evaluate, print and write results; returns the results dict."""
    args = parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not names and not args.ijb:
        raise ValueError("nothing to evaluate: --sets is empty and no --ijb")
    sets = resolve_sets(names, args.data_dir)  # fail on missing files before loading the model
    if args.ijb and not os.path.isdir(os.path.join(args.ijb, "meta")):
        raise FileNotFoundError(f"IJB meta directory not found: {os.path.join(args.ijb, 'meta')} (--ijb ROOT)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")

    from x2jax.evaluation import embed_images, verification_accuracy
    from x2jax.evaluation.loading import load_for_eval

    overrides = {"dtype": args.dtype} if args.dtype else {}
    apply_fn, variables, info = load_for_eval(args.checkpoint, **overrides)
    image_size = int(info["image_size"])
    mesh = data_mesh()
    n_dev = mesh.shape["data"]
    batch_size = -(-args.batch_size // n_dev) * n_dev
    print(
        f"checkpoint {args.checkpoint}: {info.get('arch')} embedding {info.get('embedding_size')} "
        f"image {image_size}px; {n_dev} device(s), batch {batch_size}",
        flush=True,
    )

    results: dict[str, Any] = {"checkpoint": os.path.abspath(args.checkpoint), "model": info, "sets": {}}
    for name, path in sets.items():
        images, issame = load_set(
            name, path, image_size, resize=args.resize, synthetic=synthetic_settings(args, info, image_size)
        )
        start = time.perf_counter()
        embeddings = embed_images(apply_fn, variables, images, batch_size, mesh=mesh)
        seconds = time.perf_counter() - start
        result = verification_accuracy(embeddings, issame, folds=args.folds)
        results["sets"][name] = {**result, "num_pairs": int(issame.shape[0]), "embed_seconds": seconds}
        if args.export:
            stem, ext = os.path.splitext(args.export)
            out = args.export if len(sets) == 1 else f"{stem}_{name}{ext or '.npy'}"
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            np.save(out, embeddings)
            results["sets"][name]["embeddings_file"] = out
    if results["sets"]:
        print(format_table(results["sets"]), flush=True)

    if args.ijb:
        from x2jax.evaluation import ijb

        ijb_result = ijb.evaluate_ijb(
            apply_fn,
            variables,
            args.ijb,
            args.ijb_target,
            image_size=image_size,
            batch_size=batch_size,
            use_detector_score=not args.no_detector_score,
            mesh=mesh,
        )
        results["ijb"] = ijb_result
        print(ijb.format_tar_table([ijb_result]), flush=True)

    if args.roc_dir:
        from x2jax.evaluation.plots import plot_roc

        if results["sets"]:
            curves = {f"{n} ({100 * r['accuracy']:.2f}%)": (r["fpr"], r["tpr"]) for n, r in results["sets"].items()}
            results["verification_roc_png"] = plot_roc(
                curves, os.path.join(args.roc_dir, "verification_roc.png"), title="Verification ROC"
            )
        if args.ijb:
            from x2jax.evaluation import ijb

            results["ijb_roc_png"] = ijb.plot_ijb_roc(
                [results["ijb"]], os.path.join(args.roc_dir, f"{args.ijb_target.lower()}_roc.png")
            )

    if args.export_model:
        from x2jax.evaluation.export import export_embedding, save_exported

        exported = export_embedding(apply_fn, variables, image_size=image_size)
        results["exported_model"] = save_exported(args.export_model, exported)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(_jsonable(results), f, indent=1)
        print(f"wrote {args.out}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from x2jax.runtime import use_fast_cpu_flags

    use_fast_cpu_flags()  # before JAX starts: XLA_FLAGS is read once
    sys.exit(main())
