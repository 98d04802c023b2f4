"""Default run: synthetic identities (500 x 48 images, 32x32), r18_tiny, X2-Softmax. Minutes on a 2-core CPU.

``--config configs/synthetic_tiny_x2softmax.py:arcface`` (``get_config("arcface")``) gives
the same recipe with another loss; any name in ``x2jax.losses.NAMES`` works.
"""

from x2jax.train.config import base_config, set_loss


def get_config(loss: str = "x2_softmax"):
    c = base_config()
    c.data.name, c.data.variant, c.data.batch_size = "synthetic", "small", 128
    # 500 identities x 48 images (32x32): more images per identity than the variant's
    # 1000 x 24 learns faster in a 400-step CPU run.
    c.data.num_identities, c.data.images_per_identity = 500, 48
    c.model.name, c.model.embedding_size = "r18_tiny", 128
    set_loss(c, loss)  # official constants: s=64, a=-0.9, h=0, k=0.65
    c.schedule.name, c.schedule.lr, c.schedule.warmup_steps = "polynomial", 0.1, 20
    c.num_steps = 400
    c.log_every_steps = 50
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 200
    return c
