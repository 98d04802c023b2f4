"""Model registry: names -> Flax modules, initialisation, parameter counts.

``get_model(name, ...)`` builds the module; ``init_variables(module, rng)`` is the
pure initialiser (jit it with ``out_shardings`` to create sharded variables
directly on devices); ``create`` does both on the default device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from x2jax.models.iresnet import IRESNET_LAYERS, IRESNET_WIDTHS, IResNet, check_image_size
from x2jax.models.layers import check_remat
from x2jax.models.mobilefacenet import MobileFaceNet
from x2jax.models.vit import VisionTransformer, check_vit_image_size

Variables = dict[str, Any]

# arcface_torch backbones/__init__.py: embed dim, depth, heads, drop path, mask ratio; patch 9 at
# 112 px (insightface's conv drops the last 4 rows and columns: 12 x 12 tokens). The *_dp005_*
# names are its WebFace42M variants (same parameters, other drop path / mask); vit_l is its
# only ViT-L, vit_l_dp005_mask_005.
VIT_VARIANTS: dict[str, tuple[int, int, int, float, float]] = {
    "vit_t": (256, 12, 8, 0.1, 0.1),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0),
    "vit_s": (512, 12, 8, 0.1, 0.1),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0),
    "vit_b": (512, 24, 8, 0.1, 0.1),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.05),
    "vit_l": (768, 24, 8, 0.05, 0.05),
}


def _vit_fields(dim: int, depth: int, heads: int, drop_path: float, mask: float,
                patch: int = 9, crop: int = 4) -> dict[str, Any]:
    return {"embed_dim": dim, "depth": depth, "num_heads": heads, "drop_path_rate": drop_path,
            "mask_ratio": mask, "patch_size": patch, "crop": crop}


# name -> (module class, architecture fields). Everything else (embedding_size,
# image_size, dtype, conv_impl, dropout, remat, batch_norm) is a keyword of get_model.
_ARCHS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{name: (IResNet, {"layers": layers, "widths": IRESNET_WIDTHS})
       for name, layers in IRESNET_LAYERS.items()},
    # Small IResNets for CPU runs and tests: same blocks, narrower stages.
    "r18_tiny": (IResNet, {"layers": (2, 2, 2, 2), "widths": (16, 32, 64, 128)}),
    # insightface "mbf" and "mbf_large".
    "mobilefacenet": (MobileFaceNet, {"blocks": (1, 4, 6, 2), "scale": 2}),
    "mobilefacenet_large": (MobileFaceNet, {"blocks": (2, 8, 12, 4), "scale": 4}),
    **{name: (VisionTransformer, _vit_fields(*v)) for name, v in VIT_VARIANTS.items()},
    # A small ViT for CPU runs and tests: patch 4, no crop (8 x 8 tokens at 32 px, 4 x 4 at 16).
    "vit_tiny": (VisionTransformer, _vit_fields(64, 2, 4, 0.1, 0.1, patch=4, crop=0)),
}

NAMES: tuple[str, ...] = tuple(_ARCHS)


def _field_names(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def get_model(name: str, *, embedding_size: int = 512, dtype: Any = jnp.float32,
              **kwargs: Any) -> nn.Module:
    """Returns the (unbound) Flax module ``name`` (one of :data:`NAMES`).

    Keywords: ``image_size`` (default 112; IResNet / MobileFaceNet: a multiple of 16; ViT:
    ``image_size - crop`` a multiple of ``patch_size``), ``conv_impl`` ("xla"), ``dropout``
    (IResNet), ``remat`` (``layers.REMAT_CHOICES``), ``batch_norm``, or any architecture field
    to override.
    ``dtype`` is the compute dtype ("float32", "bfloat16" or a jnp dtype).
    """
    if name not in _ARCHS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    cls, arch_fields = _ARCHS[name]
    allowed = _field_names(cls) - {"arch"}
    if "dropout" not in allowed and "dropout" in kwargs:
        if kwargs.pop("dropout"):  # a config may pass dropout=0 to every model
            raise ValueError(f"model {name!r} has no dropout; got dropout > 0")
    # JSON (model.json, configs) turns tuples into lists; module fields must be hashable.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"model {name!r}: unknown keyword(s) {sorted(unknown)}; "
                         f"allowed: {sorted(allowed - {'embedding_size', 'dtype'})}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"model {name!r}: dtype must be float32, bfloat16 or float16, got {dtype}")
    if embedding_size <= 0:
        raise ValueError(f"model {name!r}: embedding_size must be positive, got {embedding_size}")
    fields = {**arch_fields, **kwargs}
    check_remat(fields.get("remat", "none"), name)
    if cls is VisionTransformer:
        check_vit_image_size(fields.get("image_size", 112), fields["patch_size"], fields["crop"], name)
    else:
        check_image_size(fields.get("image_size", 112), name)
    return cls(embedding_size=embedding_size, dtype=dtype, arch=name, **fields)


def dummy_images(module: nn.Module, batch_size: int = 1) -> jax.Array:
    """Zeros of the module's input shape (B, S, S, 3), float32."""
    return jnp.zeros((batch_size, module.image_size, module.image_size, 3), jnp.float32)


def init_variables(module: nn.Module, rng: jax.Array) -> Variables:
    """Pure initialiser: ``{'params', 'batch_stats'}``, params float32.

    For sharded creation: ``jax.jit(functools.partial(init_variables, module),
    out_shardings=shardings)(rng)``.
    """
    variables = module.init(rng, dummy_images(module), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def abstract_variables(module: nn.Module) -> Variables:
    """``jax.ShapeDtypeStruct`` tree of :func:`init_variables` (no computation)."""
    return jax.eval_shape(functools.partial(init_variables, module), jax.random.key(0))


def create(name: str, *, embedding_size: int = 512, dtype: Any = jnp.float32,
           rng: jax.Array | None = None, image_size: int = 112,
           **kwargs: Any) -> tuple[nn.Module, Variables]:
    """Builds ``name`` and initialises it: ``(module, {'params', 'batch_stats'})``.

    ``rng`` defaults to ``jax.random.key(0)``.
    """
    module = get_model(name, embedding_size=embedding_size, dtype=dtype,
                       image_size=image_size, **kwargs)
    rng = jax.random.key(0) if rng is None else rng
    variables = jax.jit(functools.partial(init_variables, module))(rng)
    return module, variables


def count_params(module: nn.Module) -> int:
    """Number of torch-equivalent parameters of ``module`` (fixed ones included)."""
    params = abstract_variables(module)["params"]
    return sum(leaf.size for leaf in jax.tree.leaves(params)) + module.num_fixed_params


def num_params(name: str, embedding_size: int = 512, **kwargs: Any) -> int:
    """Parameter count as insightface/torch reports it (IResNet's frozen BN1d scale included).

    r50 with E=512: 43,590,848. Computed from shapes only (``jax.eval_shape``).
    """
    return count_params(get_model(name, embedding_size=embedding_size, **kwargs))


