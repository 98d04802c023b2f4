"""WebFace42M (2M identities), IResNet-100, X2-Softmax, Partial FC 0.2 (insightface wf42m_pfc02).

Set data.path to the RecordIO directory; meant for pods / multi-host GPU runs
(``distributed.*`` or X2JAX_* environment variables, see docs/parallel.md).
"""

from ms1mv3_r50_x2softmax import get_config as _recipe


def get_config(loss: str = "x2_softmax"):
    c = _recipe(loss, arch="r100")
    c.loss.sample_rate = 0.2
    c.data.batch_size = 4096  # 128 per device on 32 devices
    c.schedule.name, c.schedule.warmup_steps = "polynomial", 2000
    c.num_epochs = 20.0
    return c
