"""The X2-Softmax paper's recipe: MS1MV3 (insightface RecordIO), IResNet-50, X2-Softmax.

Official: s=64, a=-0.9, h=0, k=0.65; SGD lr 0.1, momentum 0.9, wd 5e-4 (backbone and
class centres), step decay x0.1, gradient-norm clip 5 on the backbone, class centres
N(0, 0.01), horizontal flip, ~20 epochs, 512-d embedding, batch 128 per device.
The decay points (50/75/90 % of the run) are our choice: the paper gives only "step".
Mixed precision: bfloat16 compute (the official code used fp16 autocast on GPU; set
model.dtype=float16 there for dynamic loss scaling). BatchNorm statistics per device
(``model.batch_norm = "local"``), as insightface's DDP computes them (no SyncBatchNorm in
arcface_torch): the same statistics over 128 images, and 224 fewer all-reduces per r50
step (docs/tpu.md, "BatchNorm statistics").

    python train.py --config configs/ms1mv3_r50_x2softmax.py --config.data.path=/data/ms1mv3 \
        --config.eval.data_dir=/data/ms1mv3
"""

from x2jax.train.config import base_config, set_loss


def get_config(loss: str = "x2_softmax", arch: str = "r50"):
    c = base_config()
    c.data.name = "insightface_rec"
    c.data.path = ""  # required: directory with train.rec, train.idx, property
    c.data.batch_size = 1024  # 128 per device on 8 devices
    c.model.name, c.model.embedding_size, c.model.dtype = arch, 512, "bfloat16"
    c.model.batch_norm = "local"  # per-device statistics, as insightface's DDP
    set_loss(c, loss)
    c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 0.9, 5e-4
    c.optimizer.grad_clip_norm = 5.0
    c.schedule.name, c.schedule.lr, c.schedule.boundaries = "step", 0.1, (0.5, 0.75, 0.9)
    c.num_epochs = 20.0
    c.log_every_steps = 100
    c.checkpoint.every_steps = 2000
    c.eval.every_steps = 2000
    c.eval.sets = "lfw,cfp_fp,agedb_30"
    c.compilation_cache_dir = "~/.cache/x2jax/jax_cache"
    return c
