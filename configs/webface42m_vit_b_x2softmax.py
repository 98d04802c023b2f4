"""WebFace42M (2,059,906 identities), ViT-B, X2-Softmax, Partial FC 0.3, AdamW
(arcface_torch ``configs/wf42m_pfc03_40epoch_64gpu_vit_b.py``).

Where each value comes from (files of insightface ``recognition/arcface_torch/``); the
rest is ``configs/ms1mv3_vit_t_x2softmax.py``'s, which says where its values come from:

- ``model.name = "vit_b_dp005_mask_005"``: that config's ``network`` (``backbones/__init__.py``:
  width 512, depth 24, 8 heads, drop path 0.05, mask ratio 0.05, ``using_checkpoint=True``),
  so ``model.remat = "blocks"``: each block checkpointed, as its ``torch.utils.checkpoint``
  per block (same function and parameters; ``--config.model.remat=none`` to keep activations).
- ``loss.sample_rate = 0.3``: its ``sample_rate`` (Partial FC).
- batch 384 per device on 64 devices (24,576): its ``batch_size`` and file name (64 GPUs).
- AdamW lr 1e-3, weight decay 0.1; 40 epochs; warm-up ``40 // 10 = 4`` epochs: its
  ``optimizer``, ``lr``, ``weight_decay``, ``num_epoch``, ``warmup_epoch`` (inherited); in steps
  ``42474557 // 24576 * 4 = 6912`` at this batch, as ``train_v2.py`` counts it (``num_image`` 42,474,557).
- bfloat16: its ``fp16 = True``.
- the loss: X2-Softmax; arcface_torch used CosFace (``margin_list = (1.0, 0.0, 0.4)``): ``:cosface``.
- verification on lfw, cfp_fp, agedb_30 every 2000 steps (inherited) is ours: its
  ``val_targets`` is empty.

Set data.path to the RecordIO directory; meant for pods / multi-host runs (``distributed.*``
or X2JAX_* environment variables, see docs/parallel.md).
"""

from ms1mv3_vit_t_x2softmax import get_config as _recipe


def get_config(loss: str = "x2_softmax"):
    c = _recipe(loss, arch="vit_b_dp005_mask_005")
    c.model.remat = "blocks"
    c.loss.sample_rate = 0.3
    c.data.batch_size = 384 * 64
    return c
