"""Reference implementations that tests and benchmarks share (not part of the library).

- ``torch_iresnet``: insightface's IResNet written in PyTorch, for parity tests and benchmarks.
- ``head_step``: a jitted training step of the class-sharded head alone.
"""
