"""The default synthetic run with arcface (insightface defaults) instead of X2-Softmax."""

from synthetic_tiny_x2softmax import get_config as _recipe


def get_config():
    return _recipe("arcface")
