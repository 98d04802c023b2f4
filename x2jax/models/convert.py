"""insightface PyTorch ``state_dict`` -> Flax variables (and a saved x2jax model).

    python -m x2jax.models.convert backbone.pth out_dir --arch r50 [--embedding-size 512]

Flax module names mirror the torch keys (``layer3_5`` <-> ``layer3.5``), so each Flax
leaf has exactly one torch tensor:

    Conv   kernel (KH, KW, I, O)        <- weight (O, I, KH, KW)          transpose (2, 3, 1, 0)
    Dense  kernel (F, E)                <- weight (E, F)                  transpose
           IResNet ``fc``: torch flattens NCHW (channel-major: f = c*H*W + h*W + w), Flax NHWC,
           so rows are permuted: (E, C, H, W) -> (H, W, C, E) -> (H*W*C, E)
    BN     scale, bias, mean, var       <- weight, bias, running_mean, running_var
           (``num_batches_tracked`` is ignored)
    PReLU  negative_slope (C,)          <- weight (C,)

    ViT    pos_embed (1, N, D), mask_token (1, 1, D)    <- the same tensors
           ``feature.0`` (N*D -> D): torch flattens the (B, N, D) tokens as Flax does, so a
           plain transpose; LayerNorm scale, bias <- weight, bias

IResNet's final BatchNorm1d weight is frozen at 1 in insightface and has no Flax
parameter: the converter checks that it is all ones. torch is imported only to read
the ``.pth`` file; :func:`convert_state_dict` also accepts numpy arrays.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from x2jax.models.io import save_model
from x2jax.models.iresnet import IResNet
from x2jax.models.registry import (NAMES, VIT_VARIANTS, Variables, abstract_variables, count_params,
                                   get_model)
from x2jax.models.vit import VisionTransformer

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "negative_slope"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("params", "pos_embed"): "pos_embed",  # ViT: parameters of the top module, same names
    ("params", "mask_token"): "mask_token",
}
_IGNORED_SUFFIX = ".num_batches_tracked"
_FIXED_ONES_KEY = "features.weight"  # IResNet's frozen BatchNorm1d scale


def torch_key(collection: str, path: Sequence[str]) -> str:
    """Flax (collection, module path..., leaf) -> torch state_dict key.

    ``("params", ("layer1_0", "downsample_0", "kernel"))`` -> ``"layer1.0.downsample.0.weight"``.
    """
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(parts + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"state_dict[{key!r}] has dtype {array.dtype}, expected a float tensor")
    return array.astype(np.float32)


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a ``module.`` prefix carried by every key (DistributedDataParallel saves)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _describe_iresnet(keys: Sequence[str]) -> str:
    """Blocks per stage found in IResNet-style keys, and the matching name if any."""
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    if not any(blocks):
        return ""
    from x2jax.models.iresnet import IRESNET_LAYERS
    names = [n for n, layers in IRESNET_LAYERS.items() if tuple(layers) == tuple(blocks)]
    return f" (the state_dict has blocks per stage {tuple(blocks)}" + (
        f", i.e. --arch {names[0]})" if names else ")")


def _describe_vit(state_dict: Mapping[str, Any]) -> str:
    """The ViT variant a state_dict holds (width, depth, tokens, patch) and the matching names."""
    def shape(key):
        return tuple(np.shape(state_dict[key])) if key in state_dict else None
    proj, pos = shape("patch_embed.proj.weight"), shape("pos_embed")
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if proj is None or len(proj) != 4:
        return ""
    dim = proj[0]
    tokens = f", {pos[1]} tokens" if pos and len(pos) == 3 else ""
    names = [n for n, (width, blocks, *_) in VIT_VARIANTS.items() if (width, blocks) == (dim, depth)]
    return (f" (the state_dict is a ViT of width {dim}, depth {depth}{tokens}, patch {proj[2]}"
            + (f", i.e. --arch {' or '.join(names)})" if names else ")"))


def _describe(state_dict: Mapping[str, Any], module: Any) -> str:
    if isinstance(module, IResNet):
        return _describe_iresnet(list(state_dict))
    if isinstance(module, VisionTransformer):
        return _describe_vit(state_dict)
    return ""


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch tensor shape of a Flax leaf: conv HWIO -> OIHW, dense (in, out) -> (out, in)."""
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def torch_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """The ``state_dict`` the converter expects for ``module``: torch key -> shape.

    From shapes only (``jax.eval_shape``); ``num_batches_tracked`` entries are not listed
    (they are ignored), IResNet's frozen ``features.weight`` is.
    """
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_variables(module))[0]:
        collection, *names = [str(getattr(k, "key", k)) for k in path]
        shapes[torch_key(collection, names)] = _torch_shape(tuple(leaf.shape))
    if isinstance(module, IResNet):
        shapes[_FIXED_ONES_KEY] = (module.embedding_size,)
    return shapes


def _torch_to_flax(key: str, tensor: np.ndarray, expected_shape: tuple[int, ...],
                   fc_map: tuple[int, int, int] | None) -> np.ndarray:
    """One torch tensor -> the Flax leaf of ``expected_shape`` (shape errors name the key)."""
    torch_shape = _torch_shape(expected_shape)
    if tuple(tensor.shape) != torch_shape:
        hint = ""
        if fc_map is not None and len(expected_shape) == 2:
            hint = (f"; the fc input is channels * (image_size/16)^2 = {fc_map[0]} * "
                    f"{fc_map[1]} * {fc_map[2]}: check --image-size")
        elif key in ("pos_embed", "feature.0.weight"):
            hint = "; the ViT's token count follows the image size: check --image-size"
        raise ValueError(f"state_dict[{key!r}] has shape {tuple(tensor.shape)}, expected "
                         f"{torch_shape}{hint}")
    if len(expected_shape) == 4:
        return tensor.transpose(2, 3, 1, 0)
    if len(expected_shape) == 2:
        if fc_map is not None:
            channels, height, width = fc_map
            embed = tensor.shape[0]
            return (tensor.reshape(embed, channels, height, width)
                    .transpose(2, 3, 1, 0).reshape(height * width * channels, embed))
        return tensor.T
    return tensor


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, *,
                       embedding_size: int | None = None, image_size: int = 112,
                       **model_kwargs: Any) -> Variables:
    """Maps an insightface ``state_dict`` of ``arch`` to Flax ``{'params', 'batch_stats'}``.

    ``embedding_size=None`` reads it from the checkpoint. Raises ValueError naming the
    keys that are missing, unexpected, or of the wrong shape.
    """
    if arch not in NAMES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(NAMES)}")
    state_dict = _strip_module_prefix(state_dict)
    if embedding_size is None:
        embedding_size = _read_embedding_size(state_dict, arch)
    module = get_model(arch, embedding_size=embedding_size, image_size=image_size,
                       **model_kwargs)
    abstract = abstract_variables(module)
    fc_map = None
    if isinstance(module, IResNet):
        side = image_size // 16
        fc_map = (module.widths[-1], side, side)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    wanted = {}
    for path, leaf in leaves:
        collection, *names = [str(getattr(k, "key", k)) for k in path]
        wanted[torch_key(collection, names)] = (path, leaf)
    extra_expected = {_FIXED_ONES_KEY} if isinstance(module, IResNet) else set()

    present = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIX)}
    missing = sorted((set(wanted) | extra_expected) - present)
    unexpected = sorted(present - set(wanted) - extra_expected)
    if missing or unexpected:
        described = _describe(state_dict, module)
        raise ValueError(
            f"state_dict does not match --arch {arch}{described}: "
            f"{len(missing)} missing key(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
            f"{len(unexpected)} unexpected key(s) {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}")

    if isinstance(module, IResNet):
        fixed = _to_numpy(state_dict[_FIXED_ONES_KEY], _FIXED_ONES_KEY)
        if fixed.shape != (embedding_size,) or not np.allclose(fixed, 1.0):
            raise ValueError(f"state_dict[{_FIXED_ONES_KEY!r}] must be ones of shape "
                             f"({embedding_size},) (frozen in insightface); got shape "
                             f"{fixed.shape}, range [{fixed.min()}, {fixed.max()}]")

    converted = []
    for key, (path, leaf) in wanted.items():
        tensor = _to_numpy(state_dict[key], key)
        use_fc_map = fc_map if key == "fc.weight" else None
        try:
            converted.append(_torch_to_flax(key, tensor, tuple(leaf.shape), use_fc_map))
        except ValueError as e:  # another variant of the same family: say which
            if isinstance(module, VisionTransformer):
                raise ValueError(f"{e}; --arch {arch} is a ViT of width {module.embed_dim}, depth "
                                 f"{module.depth}, {module.num_patches} tokens{_describe_vit(state_dict)}") from None
            raise
    variables = jax.tree_util.tree_unflatten(treedef, converted)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _read_embedding_size(state_dict: Mapping[str, Any], arch: str) -> int:
    for key in ("features.running_mean", "features.layers.3.running_mean", "feature.3.running_mean",
                "fc.bias"):
        if key in state_dict:
            return int(np.shape(_to_numpy(state_dict[key], key))[0])
    raise ValueError(f"cannot read the embedding size from the state_dict for --arch {arch} "
                     f"(no features.running_mean); pass --embedding-size")


def load_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of an insightface ``backbone.pth`` / ``model.pt`` (a plain state_dict)."""
    try:
        import torch
    except ImportError as e:  # torch is an optional extra
        raise ImportError("reading .pth files needs PyTorch: pip install 'x2jax[torch]'") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict "
                         f"(a mapping of parameter names to tensors, as insightface saves)")
    return dict(obj)


def convert_checkpoint(pth_path: str | Path, out_dir: str | Path, *, arch: str,
                       embedding_size: int | None = None, image_size: int = 112) -> Path:
    """Reads ``pth_path``, converts it and saves an x2jax model in ``out_dir``."""
    state_dict = _strip_module_prefix(load_torch_state_dict(pth_path))
    if embedding_size is None:
        embedding_size = _read_embedding_size(state_dict, arch)
    variables = convert_state_dict(state_dict, arch, embedding_size=embedding_size,
                                   image_size=image_size)
    return save_model(out_dir, variables, arch=arch, embedding_size=embedding_size,
                      image_size=image_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m x2jax.models.convert",
        description="Convert an insightface PyTorch backbone state_dict to an x2jax model.")
    parser.add_argument("pth", help="backbone.pth / model.pt (torch.save of a state_dict)")
    parser.add_argument("out_dir", help="output directory (model.json + Orbax variables)")
    parser.add_argument("--arch", required=True, choices=NAMES)
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="default: read from the checkpoint")
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.pth, args.out_dir, arch=args.arch,
                                 embedding_size=args.embedding_size, image_size=args.image_size)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "model.json").read_text())
    module = get_model(args.arch, embedding_size=info["embedding_size"],
                       image_size=info["image_size"])
    print(f"saved {args.arch} (embedding {info['embedding_size']}, image {info['image_size']}, "
          f"{count_params(module):,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
