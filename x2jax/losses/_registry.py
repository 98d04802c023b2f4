"""The loss registry: one :class:`MarginSpec` per loss name."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

import jax

from x2jax.losses._common import MarginFn, TargetMargin, target_margin_logits

Array = jax.Array
State = dict[str, Array]


def _no_state() -> State:
    return {}


def _same_state(state: State, *, target_cosine: Array, norms: Array) -> State:
    del target_cosine, norms
    return state


@dataclasses.dataclass(frozen=True)
class MarginSpec:
    """Everything the library knows about a loss, asked by name.

    ``margin_loss``, the sharded head, config validation, ``set_loss`` and the
    training state read these fields; nothing inspects a function's signature.

    Attributes:
      name: the registry name (``config.loss.name``).
      fn: the margin function ``fn(cosine (B, C), labels (B,), **kw) -> (B, C)
        float32 logits``. Optional when ``target_margin`` is given: then built
        from it (``target_margin_logits(cosine, labels, target_margin(**kw))``).
      target_margin: ``target_margin(**kw) -> TargetMargin | None``, the loss as a
        target-only margin (its keywords with ``fn``'s defaults; None where they
        make it change non-target logits). None: not target-only.
        ``margin_loss`` then takes its fused cross-entropy and the sharded head
        splits non-target and target logits.
      params: keyword names a config may set (``config.loss.params``); state,
        ``norms`` and ``rng`` are not among them.
      preset: official parameters, the ones ``set_loss`` writes.
      init_state: ``() -> state``, the initial loss state ({} if stateless). The
        state's keys are keywords of ``fn``; the training step passes them.
      update_state: ``(state, *, target_cosine (B,), norms (B,)) -> state``, run
        after each training step.
      needs_norms: ``fn`` takes ``norms`` (B,), the embedding norms, filled in by
        the heads.
      needs_rng: ``fn`` takes ``rng``, a PRNG key, filled in by the sharded head.
      nontarget_depends_on_target: non-target logits depend on ``cos_y``
        (CurricularFace's hard negatives); the sharded head then calls ``fn``
        with ``cos_y`` appended to its cosine block.

    Examples:
      >>> spec = losses.spec("x2_softmax")
      >>> spec.preset
      mappingproxy({'scale': 64.0, 'a': -0.9, 'h': 0.0, 'k': 0.65})
    """

    name: str
    fn: MarginFn | None = None
    target_margin: Callable[..., TargetMargin | None] | None = None
    params: tuple[str, ...] = ()
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_state: Callable[[], State] = _no_state
    update_state: Callable[..., State] = _same_state
    needs_norms: bool = False
    needs_rng: bool = False
    nontarget_depends_on_target: bool = False

    def __post_init__(self):
        if self.fn is None and self.target_margin is None:
            raise ValueError(f"MarginSpec {self.name!r}: give fn, target_margin or both")
        unknown = set(self.preset) - set(self.params)
        if unknown:
            raise ValueError(f"MarginSpec {self.name!r}: preset {sorted(unknown)} not in params")
        if self.fn is None:
            object.__setattr__(self, "fn", _logits_fn(self.name, self.target_margin))
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "preset", types.MappingProxyType(dict(self.preset)))

    def target_only(self, params: Mapping[str, Any]) -> TargetMargin | None:
        """The :class:`TargetMargin` of ``fn(., ., **params)``; None if not target-only.

        Raises:
          TypeError: a keyword ``target_margin`` does not take, as a call would.
        """
        if self.target_margin is None or self.nontarget_depends_on_target:
            return None
        return self.target_margin(**params)


def _logits_fn(name: str, target_margin: Callable[..., TargetMargin | None]) -> MarginFn:
    def fn(cosine: Array, labels: Array, **params: Any) -> Array:
        margin = target_margin(**params)
        if margin is None:
            raise ValueError(f"loss {name!r} is not target-only for {params}; register it with a fn")
        return target_margin_logits(cosine, labels, margin)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"(B, C) float32 logits of the target-only loss {name!r}, from its target_margin."
    return fn


_SPECS: dict[str, MarginSpec] = {}
NAMES: tuple[str, ...] = ()


def register(spec: MarginSpec) -> MarginSpec:
    """Adds a loss to the registry; every name-taking API then accepts it.

    Args:
      spec: the loss's :class:`MarginSpec`.

    Returns:
      ``spec``.

    Raises:
      ValueError: the name is taken.

    Examples:
      >>> def toy(*, scale=32.0, margin=0.2):
      ...   return losses.TargetMargin(scale, lambda cos_y: cos_y - margin)
      >>> _ = losses.register(losses.MarginSpec("toy", target_margin=toy, params=("scale", "margin")))
    """
    global NAMES
    if spec.name in _SPECS:
        raise ValueError(f"loss {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    NAMES = tuple(sorted(_SPECS))
    return spec


def spec(name: str) -> MarginSpec:
    """The :class:`MarginSpec` registered as ``name``.

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(NAMES)}") from None


def spec_of(margin_fn: MarginFn | str | MarginSpec) -> MarginSpec:
    """The spec of a registry name or function; a plain spec for other functions.

    A function outside the registry gets ``MarginSpec(name, fn=margin_fn)``: the
    generic path, with no norms, rng or state filled in.
    """
    if isinstance(margin_fn, MarginSpec):
        return margin_fn
    if isinstance(margin_fn, str):
        return spec(margin_fn)
    found = next((s for s in _SPECS.values() if s.fn is margin_fn), None)
    return found or MarginSpec(getattr(margin_fn, "__name__", repr(margin_fn)), fn=margin_fn)


def get(name: str) -> MarginFn:
    """The margin function registered as ``name`` (see ``NAMES``)."""
    return spec(name).fn


def initial_state(name: str) -> State:
    """Initial loss state of ``name`` (keywords of its margin function), {} if stateless."""
    return spec(name).init_state()


def update_state(name: str, state: State, *, target_cosine: Array, norms: Array) -> State:
    """Advances the loss state of ``name`` after a step; identity if stateless.

    Args:
      name: the loss name.
      state: the current state.
      target_cosine: (B,) ``cos_y`` of the batch.
      norms: (B,) embedding norms.

    Returns:
      The new state.
    """
    return spec(name).update_state(state, target_cosine=target_cosine, norms=norms)
