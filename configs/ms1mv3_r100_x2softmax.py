"""MS1MV3, IResNet-100, X2-Softmax: the paper's recipe with the deeper backbone."""

from ms1mv3_r50_x2softmax import get_config as _recipe


def get_config(loss: str = "x2_softmax"):
    return _recipe(loss, arch="r100")
