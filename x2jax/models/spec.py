"""``ModelSpec``: what a backbone is and how it runs, as stored in checkpoints and saved models.

    spec = ModelSpec.from_config(config, image_size)    # a training config
    module = spec.build()                                # conv_impl "auto" resolved here, once
    meta["model"] = spec.to_json()                       # checkpoints, best_model/model.json

Fields split in three:

* what the model computes: ``arch``, ``embedding_size``, ``image_size``, ``layers``,
  ``widths``, ``dtype`` and ``dropout``; a resume must keep them;
* :data:`RUNTIME_FIELDS` (``conv_impl``): how the convolutions run, the same function
  up to rounding; a resume may change them (:meth:`ModelSpec.same_function`);
* :data:`LOAD_FIELDS` (:data:`RUNTIME_FIELDS` plus ``dtype`` and ``dropout``): what a
  loader may override for inference (another precision; dropout is inactive there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from x2jax.models.layers import resolve_conv_impl
from x2jax.models.registry import get_model

RUNTIME_FIELDS: tuple[str, ...] = ("conv_impl", "remat", "batch_norm")
"""Fields that say how the model runs or trains, not what it computes at inference (a resume may
change them): the conv implementation, gradient checkpointing, and whether training BatchNorm
statistics are taken over the global batch or per device."""

LOAD_FIELDS: tuple[str, ...] = RUNTIME_FIELDS + ("dtype", "dropout")
"""Fields a loader may override (``load_model``, ``load_backbone``): they change no shape."""

_LIST_FIELDS = ("layers", "widths")


def _int_tuple(value: Iterable[int] | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value else None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A backbone: the keywords of :func:`x2jax.models.get_model` and their JSON form.

    Attributes:
      arch: a name in :data:`x2jax.models.NAMES`.
      embedding_size: output width E.
      image_size: input side S (a multiple of 16; ViT: ``S - crop`` a multiple of the patch).
      dtype: compute dtype name ("float32", "bfloat16", "float16").
      conv_impl: a name in :data:`x2jax.models.layers.CONV_IMPLS` ("auto": resolved by
        :meth:`build`).
      dropout: dropout rate before the embedding layer (IResNet).
      remat: gradient checkpointing, "none", "blocks" or a policy name.
      batch_norm: training statistics over the "global" batch or per device ("local").
      layers: blocks per stage (None: the architecture's).
      widths: channels per stage (None: the architecture's).
    """

    arch: str
    embedding_size: int
    image_size: int
    dtype: str = "float32"
    conv_impl: str = "auto"
    dropout: float = 0.0
    remat: str = "none"
    batch_norm: str = "global"
    layers: tuple[int, ...] | None = None
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Empty and JSON-list forms normalised, so that from_json(to_json()) == self.
        object.__setattr__(self, "embedding_size", int(self.embedding_size))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        for key in _LIST_FIELDS:
            object.__setattr__(self, key, _int_tuple(getattr(self, key)))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The JSON keys a spec may have."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, config: Any, image_size: int) -> ModelSpec:
        """The spec of a training config's ``model`` section for images of ``image_size``."""
        m = config.model
        return cls(arch=m.name, embedding_size=int(m.embedding_size), image_size=int(image_size),
                   dtype=m.dtype, conv_impl=m.conv_impl, dropout=float(m.dropout),
                   remat=m.remat, batch_norm=m.batch_norm, layers=m.layers or None, widths=m.widths or None)

    def to_json(self) -> dict[str, Any]:
        """The JSON dict stored in checkpoints (``meta["model"]``) and ``model.json``.

        Returns:
          ``arch``, ``embedding_size``, ``image_size``, ``dtype``, ``conv_impl``,
          ``dropout``, ``remat`` / ``batch_norm`` when not the default, and ``layers`` /
          ``widths`` as lists when set.
        """
        d: dict[str, Any] = {"arch": self.arch, "embedding_size": self.embedding_size,
                             "image_size": self.image_size, "dtype": self.dtype,
                             "conv_impl": self.conv_impl, "dropout": self.dropout}
        for key, default in (("remat", "none"), ("batch_norm", "global")):
            if getattr(self, key) != default:  # old readers keep reading default specs
                d[key] = getattr(self, key)
        for key in _LIST_FIELDS:
            if getattr(self, key):
                d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> ModelSpec:
        """The spec of a :meth:`to_json` dict (missing optional keys take their defaults).

        Args:
          d: the dict.
          ignore: other keys that ``d`` may hold (e.g. a loader's ``format``, ``path``).

        Raises:
          ValueError: ``d`` has no ``arch`` or a key that is neither a field nor ignored.
        """
        unknown = set(d) - set(cls.field_names()) - set(ignore)
        if unknown:
            raise ValueError(f"model description has unknown key(s) {sorted(unknown)}; "
                             f"known: {list(cls.field_names())}")
        if "arch" not in d:
            raise ValueError(f"model description has no 'arch' entry: {dict(d)}")
        return cls(**{k: v for k, v in d.items() if k in cls.field_names()})

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with ``changes`` (e.g. a loader's overrides, ``conv_impl="xla"`` for export)."""
        return dataclasses.replace(self, **changes)

    def same_function(self, other: ModelSpec) -> bool:
        """Whether ``other`` has the same parameters and function (:data:`RUNTIME_FIELDS` aside)."""
        keep = lambda s: s.replace(**{k: getattr(self, k) for k in RUNTIME_FIELDS})
        return keep(self) == keep(other)

    def build(self, platform: str | None = None, num_devices: int | None = None,
              batch_shards: int = 1) -> nn.Module:
        """The Flax module, with ``conv_impl="auto"`` resolved for where it will run.

        The convs then decide nothing from the process's state at trace time
        (:func:`x2jax.models.layers.resolve_conv_impl`).

        Args:
          platform: "cpu", "gpu" or "tpu" (default: ``jax.default_backend()``); pass
            the target's when compiling ahead of time for another platform.
          num_devices: devices the model runs on (default: ``jax.device_count()``).
          batch_shards: devices the training batch is split over (the mesh's batch axes):
            with ``batch_norm="local"`` each BatchNorm takes its training statistics per
            shard; 1 (one group: the whole batch) otherwise. A training-layout setting,
            not part of the spec (a checkpoint resumes with another count).

        Raises:
          ValueError: an unknown architecture or an invalid keyword (``get_model``).
        """
        kwargs: dict[str, Any] = {"embedding_size": self.embedding_size, "image_size": self.image_size,
                                  "dtype": self.dtype, "dropout": self.dropout,
                                  "remat": self.remat, "batch_norm": self.batch_norm,
                                  "batch_shards": int(batch_shards),
                                  "conv_impl": resolve_conv_impl(self.conv_impl, platform, num_devices)}
        for key in _LIST_FIELDS:
            if getattr(self, key):
                kwargs[key] = getattr(self, key)
        return get_model(self.arch, **kwargs)
