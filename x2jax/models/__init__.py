"""Face-recognition backbones in Flax Linen (NHWC): IResNet r18..r200, MobileFaceNet, ViT (arcface_torch).

    module, variables = create("r50", embedding_size=512, dtype=jnp.bfloat16)
    embeddings = module.apply(variables, images, train=False)   # (B, 512) float32

Images are (B, S, S, 3) float, normalised as (x/255 - 0.5)/0.5; S defaults to 112.
Convert insightface weights with ``python -m x2jax.models.convert``.
"""

from x2jax._extras import require

require("train", "flax", "orbax.checkpoint", what="x2jax.models")

from x2jax.models.io import load_backbone, load_model, save_model
from x2jax.models.iresnet import IResNet
from x2jax.models.layers import conv2d
from x2jax.models.mobilefacenet import MobileFaceNet
from x2jax.models.registry import (NAMES, abstract_variables, count_params, create, get_model,
                                   init_variables, num_params)
from x2jax.models.spec import ModelSpec
from x2jax.models.vit import VisionTransformer

__all__ = ["NAMES", "IResNet", "MobileFaceNet", "ModelSpec", "abstract_variables", "conv2d", "count_params",
           "create", "get_model", "init_variables", "load_backbone", "load_model", "num_params", "save_model",
           "VisionTransformer"]
