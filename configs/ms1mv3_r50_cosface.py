"""The X2-Softmax paper's MS1MV3 / IResNet-50 recipe with cosface (insightface defaults)."""

from ms1mv3_r50_x2softmax import get_config as _recipe


def get_config():
    return _recipe("cosface")
