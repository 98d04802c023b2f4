"""Evaluate a face-recognition checkpoint: verification pairs, IJB-B/C 1:1, exports.

    python eval.py --checkpoint DIR                              # synthetic verification set
    python eval.py --checkpoint DIR --sets lfw,cfp_fp,agedb_30 --data-dir /data/faces_emore
    python eval.py --checkpoint DIR --ijb /data/IJB_release/IJBC --ijb-target IJBC
    python eval.py --checkpoint DIR --out results.json --roc-dir roc/ --export emb.npy
    python eval.py --checkpoint DIR --export-onnx model.onnx                # insightface ONNX; no evaluation

(``python -m x2jax.evaluation`` takes the same arguments.) Verification follows
insightface's protocol (docs/evaluation.md): flip-summed embeddings, 10 folds,
thresholds arange(0, 4, 0.01). Embedding is jitted and its batch split over all
local devices (x2jax.parallel mesh, model axis 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from x2jax.evaluation import ijb, report, sets
from x2jax.evaluation.loading import load_for_eval
from x2jax.evaluation.onnx_export import OnnxExtraMissing
from x2jax.evaluation.verification import embed_images, verification_accuracy
from x2jax.parallel import DEFAULT_RULES, make_mesh, mesh_axis_size


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``eval.py`` / ``python -m x2jax.evaluation``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="saved model dir (model.json + variables/) or train.py checkpoint")
    p.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated verification sets: '{sets.SYNTHETIC}' (generated; the default) or names of "
        "<data-dir>/<name>.bin (or of a prepared TFDS face_verification/<name> in <data-dir>); "
        "with --export-onnx and neither --sets nor --ijb, nothing is evaluated",
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
    p.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                   help="resize set images of another size to the model's image size, bilinear, as insightface and "
                        "training do (default); --no-resize makes another size an error")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (rounded up to the device count)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--ijb", default=None, help="IJB root (meta/, loose_crop/) to run the 1:1 protocol")
    p.add_argument("--ijb-target", default="IJBC", choices=("IJBB", "IJBC"))
    p.add_argument("--no-detector-score", action="store_true", help="IJB: do not weight images by detector score")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--roc-dir", default=None, help="write ROC plots (PNG) here")
    p.add_argument("--export", default=None, help="save flip-summed embeddings (.npy; one file per set: name_<set>.npy)")
    p.add_argument("--export-model", default=None, help="save the embedding function with jax.export to this file")
    p.add_argument(
        "--export-onnx",
        default=None,
        metavar="FILE.onnx",
        help="write an ONNX model for insightface (model_zoo.get_model / FaceAnalysis): float32 NCHW RGB input "
        "normalised (x - 127.5) / 127.5, dynamic batch; alone (no --sets / --ijb) it exports and exits",
    )
    p.add_argument("--dtype", default=None, help="compute dtype override (float32, bfloat16)")
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parsed command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser(prog).parse_args(argv)


def synthetic_set_ref(args: argparse.Namespace, info: dict[str, Any]) -> sets.SyntheticSetRef:
    """Reference of the ``synthetic`` set: the checkpoint's, unless the flags say otherwise.

    A checkpoint's ``info["synthetic"]`` (filled by the train checkpoint loader) is
    the default, so that the held-out identities are those of that run;
    ``--synthetic-config`` replaces it and ``--synthetic-num-identities`` sets
    ``num_identities``.
    """
    ref = sets.SyntheticSetRef.from_info(info.get("synthetic"))
    if args.synthetic_config is not None:
        ref = sets.SyntheticSetRef(args.synthetic_config)
    if args.synthetic_num_identities > 0:
        ref = ref.replace(num_identities=args.synthetic_num_identities)
    return ref


def iter_verification_sets(
    args: argparse.Namespace, sources: Sequence[sets.SetSource], info: dict[str, Any], image_size: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, images, issame) of each located set at the model's size, one set in memory at a time."""
    synthetic = synthetic_set_ref(args, info)
    for source in sources:
        images, issame = sets.open_verification_set(
            source, image_size=image_size, synthetic=synthetic, resize=args.resize
        )
        yield source.name, images, issame


def _save_embeddings(export: str, name: str, num_sets: int, embeddings: np.ndarray) -> str:
    stem, ext = os.path.splitext(export)
    out = export if num_sets == 1 else f"{stem}_{name}{ext or '.npy'}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, embeddings)
    return out


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as ``args`` say, print the tables and write the outputs; returns the results dict.

    Raises:
      FileNotFoundError: a set, the IJB meta folder or the checkpoint is missing
        (checked before the model is loaded where possible).
      ValueError: an empty request, a bad batch size, or a set that does not fit.
    """
    if args.export_onnx:
        from x2jax.evaluation.onnx_export import prepare_output_path  # noqa: PLC0415

        prepare_output_path(args.export_onnx)  # an unwritable path fails before the model loads
    if args.export_onnx and args.sets is None and not args.ijb:
        return export_only(args)
    names = [s.strip() for s in (sets.SYNTHETIC if args.sets is None else args.sets).split(",") if s.strip()]
    if not names and not args.ijb:
        raise ValueError("nothing to evaluate: --sets is empty and no --ijb")
    sources = sets.resolve_verification_sets(names, data_dir=args.data_dir)  # before loading the model
    if args.ijb and not os.path.isdir(os.path.join(args.ijb, "meta")):
        raise FileNotFoundError(f"IJB meta directory not found: {os.path.join(args.ijb, 'meta')} (--ijb ROOT)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")

    apply_fn, variables, info = load_for_eval(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
    image_size = int(info["image_size"])
    mesh = make_mesh(devices=jax.local_devices(), model=1)
    shards = mesh_axis_size(mesh, DEFAULT_RULES.batch)
    batch_size = -(-args.batch_size // shards) * shards
    print(
        f"checkpoint {args.checkpoint}: {info.get('arch')} embedding {info.get('embedding_size')} "
        f"image {image_size}px; {shards} device(s), batch {batch_size}",
        flush=True,
    )

    results: dict[str, Any] = {"checkpoint": os.path.abspath(args.checkpoint), "model": info, "sets": {}}
    if args.export_onnx:  # before evaluating: a model that does not convert fails fast
        results["exported_onnx"] = _export_onnx(args.export_onnx, info, variables)
    for name, images, issame in iter_verification_sets(args, sources, info, image_size):
        start = time.perf_counter()
        embeddings = embed_images(apply_fn, variables, images, batch_size, mesh=mesh)
        seconds = time.perf_counter() - start
        result = verification_accuracy(embeddings, issame, folds=args.folds)
        results["sets"][name] = {**result, "num_pairs": int(issame.shape[0]), "embed_seconds": seconds}
        if args.export:
            results["sets"][name]["embeddings_file"] = _save_embeddings(args.export, name, len(sources), embeddings)
    if results["sets"]:
        print(report.format_verification_table(results["sets"]), flush=True)

    if args.ijb:
        results["ijb"] = ijb.evaluate_ijb(
            apply_fn,
            variables,
            args.ijb,
            args.ijb_target,
            image_size=image_size,
            batch_size=batch_size,
            use_detector_score=not args.no_detector_score,
            mesh=mesh,
        )
        print(report.format_ijb_table([results["ijb"]]), flush=True)

    if args.roc_dir:
        if results["sets"]:
            results["verification_roc_png"] = report.plot_verification_roc(
                results["sets"], os.path.join(args.roc_dir, "verification_roc.png")
            )
        if args.ijb:
            results["ijb_roc_png"] = report.plot_ijb_roc(
                [results["ijb"]], os.path.join(args.roc_dir, f"{args.ijb_target.lower()}_roc.png")
            )

    return _export_model_and_write(args, info, variables, results)


def _export_model_and_write(args: argparse.Namespace, info: dict[str, Any], variables: Any,
                            results: dict[str, Any]) -> dict[str, Any]:
    """``--export-model`` (StableHLO) and ``--out`` (JSON) of a finished run of the command."""
    if args.export_model:
        from x2jax.evaluation.export import export_embedding, save_exported  # noqa: PLC0415
        from x2jax.evaluation.loading import model_spec  # noqa: PLC0415

        spec = model_spec(info, **({"dtype": args.dtype} if args.dtype else {}))
        results["exported_model"] = save_exported(args.export_model, export_embedding(spec, variables))
    if args.out:
        print(f"wrote {report.write_json(args.out, results)}", flush=True)
    return results


def _export_onnx(path: str, info: dict[str, Any], variables: Any) -> str:
    from x2jax.evaluation.onnx_export import export_onnx  # noqa: PLC0415  (the onnx extra)

    exported = export_onnx(info, variables, path)
    print(f"wrote {exported.path} ({exported.arch}, ONNX opset {exported.opset}, "
          f"converted in {exported.seconds:.1f} s)\n{exported.describe()}", flush=True)
    return exported.path


def export_only(args: argparse.Namespace) -> dict[str, Any]:
    """``--export-onnx`` without ``--sets`` / ``--ijb``: load, export (ONNX, and
    ``--export-model`` if given), write ``--out``; nothing is evaluated."""
    _, variables, info = load_for_eval(args.checkpoint)  # float32: the ONNX graph is float32
    print(f"checkpoint {args.checkpoint}: {info.get('arch')} embedding {info.get('embedding_size')} "
          f"image {info['image_size']}px", flush=True)
    results: dict[str, Any] = {"checkpoint": os.path.abspath(args.checkpoint), "model": info, "sets": {}}
    results["exported_onnx"] = _export_onnx(args.export_onnx, info, variables)
    return _export_model_and_write(args, info, variables, results)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and :func:`evaluate`; returns the results dict."""
    return evaluate(parse_args(argv))


def main(argv: Sequence[str] | None = None, prog: str = "eval.py") -> int:
    """Command-line entry: 0 on success, 2 with a one-line error for what the user can fix."""
    try:
        evaluate(parse_args(argv, prog))
    except (FileNotFoundError, ValueError, NotImplementedError, OnnxExtraMissing) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
