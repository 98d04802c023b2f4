"""Research comparisons: the large synthetic set (112x112, 2000 identities), IResNet-18.

``get_config("arcface")`` / ``:cosface`` etc. for the peers under the same recipe.
"""

from x2jax.train.config import base_config, set_loss


def get_config(loss: str = "x2_softmax"):
    c = base_config()
    c.data.name, c.data.variant, c.data.batch_size = "synthetic", "large", 256
    c.model.name, c.model.embedding_size = "r18", 512
    set_loss(c, loss)
    c.schedule.name, c.schedule.lr, c.schedule.boundaries = "step", 0.1, (0.5, 0.75, 0.9)
    c.num_epochs = 10.0
    c.log_every_steps = 50
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    return c
