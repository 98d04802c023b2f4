"""MS1MV3 (insightface RecordIO), ViT-T (arcface_torch ``vit_t``), X2-Softmax, AdamW.

arcface_torch ships no MS1MV3 ViT config: this recipe takes the optimisation of its ViT
configs and the data of its MS1MV3 configs. Where each value comes from (files of
insightface ``recognition/arcface_torch/``):

- ``model.name = "vit_t"``: ``backbones/__init__.py`` "vit_t" (width 256, depth 12, 8 heads,
  drop path 0.1, mask ratio 0.1, patch 9 on 112 px); ``embedding_size`` 512: every config's.
- AdamW, lr 1e-3, weight decay 0.1: ``configs/wf42m_pfc03_40epoch_8gpu_vit_t.py`` (and every
  ViT config; ``configs/base.py``'s "For AdamW" block says the same); one AdamW over backbone
  and class centres as ``train_v2.py`` builds it, with torch's default betas (0.9, 0.999) and
  eps 1e-8, which it keeps.
- backbone gradient clipped to global norm 5: ``train_v2.py`` (``clip_grad_norm_(backbone.parameters(), 5)``).
- schedule: linear warm-up from 0, then ``lr * (1 - progress)^2`` to 0: ``lr_scheduler.py``
  ``PolyScheduler`` (power 2), which ``train_v2.py`` uses; warm-up ``num_epoch // 10`` epochs
  (the ViT configs' ``warmup_epoch``): ``schedule.warmup_epochs``, in steps as ``train_v2.py``
  counts them (``num_image // total_batch * warmup_epoch``) for whatever batch the run has.
- 40 epochs: the ViT configs' ``num_epoch`` (their WebFace42M runs; our choice for MS1MV3,
  whose IResNet configs train 20-25 epochs).
- batch 128 per device on 8 devices, full softmax (``sample_rate`` 1), 5,179,510 images:
  ``configs/ms1mv3_r50.py`` (batch_size 128, sample_rate 1.0, num_image) on its 8 GPUs.
- bfloat16 compute: the configs' ``fp16 = True`` (autocast on GPU; ``model.dtype=float16``
  gives float16 with dynamic loss scaling).
- the loss: X2-Softmax, this project's; arcface_torch's ViT configs use CosFace
  (``margin_list = (1.0, 0.0, 0.4)``): ``--config configs/ms1mv3_vit_t_x2softmax.py:cosface``.
- verification on lfw, cfp_fp, agedb_30: ``configs/ms1mv3_r50.py``'s ``val_targets``.
- the head's BatchNorm1d statistics per device (``model.batch_norm = "local"``): ``train_v2.py``
  wraps the backbone in DDP without SyncBatchNorm.

    python train.py --config configs/ms1mv3_vit_t_x2softmax.py --config.data.path=/data/ms1mv3 \
        --config.eval.data_dir=/data/ms1mv3
"""

from x2jax.train.config import base_config, set_loss


def get_config(loss: str = "x2_softmax", arch: str = "vit_t"):
    c = base_config()
    c.data.name = "insightface_rec"
    c.data.path = ""  # required: directory with train.rec, train.idx, property
    c.data.batch_size = 1024  # 128 per device on 8 devices
    c.model.name, c.model.embedding_size, c.model.dtype = arch, 512, "bfloat16"
    c.model.batch_norm = "local"  # the head's two BatchNorm1d: per device, as insightface's DDP
    set_loss(c, loss)
    c.optimizer.name, c.optimizer.weight_decay = "adamw", 0.1
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.grad_clip_norm = 5.0
    c.num_epochs = 40.0
    c.schedule.name, c.schedule.lr, c.schedule.power, c.schedule.end_lr = "polynomial", 1e-3, 2.0, 0.0
    c.schedule.warmup_epochs = float(int(c.num_epochs) // 10)
    c.log_every_steps = 100
    c.checkpoint.every_steps = 2000
    c.eval.every_steps = 2000
    c.eval.sets = "lfw,cfp_fp,agedb_30"
    c.compilation_cache_dir = "~/.cache/x2jax/jax_cache"
    return c
