"""Compile the x2jax train step for a TPU topology on any host, no TPU needed.

With libtpu installed (``pip install 'x2jax[tpu]'``) JAX builds compile-only
devices for a named TPU slice ("deviceless AOT"); lowering the real train step
on abstract inputs over a mesh of them runs the TPU compiler here, and the
compiled program tells the per-chip memory and every collective it issues::

    mesh = topology_mesh("v5e:2x2")
    compiled = compile_train_step(config, "v5e:2x2", num_classes=1000, image_size=112)
    plan = summarize_compiled(compiled)  # plan.memory, plan.collectives

The seed of ``python -m x2jax.plan``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import re
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh

INSTALL_HINT = "pip install 'x2jax[tpu]'"
# Names libtpu 0.0.42.1 accepts (checked with get_topology_desc); any "<gen>:<AxB[xC]>" may work.
KNOWN_TOPOLOGIES = ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v5p:2x2x4", "v6e:2x4")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Deviceless compiles on a host that is no TPU VM: libtpu otherwise warns about what it cannot find.
_QUIET_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}


def _require_libtpu() -> None:
    try:
        importlib.import_module("libtpu")
    except ImportError as e:
        raise ImportError(f"compiling for a TPU topology needs libtpu: {INSTALL_HINT}") from e


def topology_devices(topology_name: str) -> list[jax.Device]:
    """The compile-only devices of a TPU slice such as ``"v5e:2x2"`` (one per chip on v5e/v5p/v6e)."""
    _require_libtpu()
    if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):  # not a TPU process: quiet libtpu's probing
        for key, value in _QUIET_LIBTPU_ENV.items():
            os.environ.setdefault(key, value)
    from jax.experimental import topologies  # noqa: PLC0415

    def get(**kwargs):
        return topologies.get_topology_desc(topology_name=topology_name, platform="tpu", **kwargs).devices

    try:
        try:
            return list(get())
        except jax.errors.JaxRuntimeError as e:  # a slice smaller than a 2x2 host (v5e:1x1): one host
            dims = re.fullmatch(r"[^:]+:([0-9]+(?:x[0-9]+)*)", topology_name)
            bounds = tuple(int(d) for d in dims.group(1).split("x")) if dims else ()
            if "chips_per_host_bounds" not in str(e) or not bounds or max(bounds) > 2:
                raise
            return list(get(chips_per_host_bounds=(bounds + (1, 1))[:3]))
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"unknown TPU topology {topology_name!r} ({str(e).splitlines()[0]}); "
                         f"known to work: {', '.join(KNOWN_TOPOLOGIES)}") from None


def topology_mesh(topology_name: str, *, model: int = 1) -> Mesh:
    """The ``("data", "model")`` x2jax mesh over a TPU topology's compile-only devices.

    Raises:
      ImportError: libtpu is not installed (``pip install 'x2jax[tpu]'``).
      ValueError: libtpu does not know ``topology_name``, it has two devices per chip (v4
        megacore), or ``model`` does not divide its chips.
    """
    from x2jax.parallel.mesh import make_mesh  # noqa: PLC0415

    devices = topology_devices(topology_name)
    if len({(d.process_index, tuple(d.coords)) for d in devices}) < len(devices):
        raise ValueError(f"TPU topology {topology_name!r} has {len(devices)} devices on fewer chips (megacore, "
                         f"e.g. v4): jax.make_mesh wants one device per chip; use v5e, v5p or v6e")
    return make_mesh(data=-1, model=model, devices=devices)


def compile_train_step(config: Any, topology_name: str, *, num_classes: int, image_size: int,
                       total_steps: int = 1000, model: int | None = None) -> Any:
    """``jax.stages.Compiled`` of ``config``'s full train step for ``topology_name``.

    The step of :func:`x2jax.train.setup.build_step` built for platform "tpu",
    lowered on ``(step.abstract_state, abstract batch of config.data.batch_size)``.
    ``model`` (default ``config.mesh.model``) is the model-axis size.
    """
    from x2jax.parallel.sharding import ShardingRules  # noqa: PLC0415
    from x2jax.train.setup import build_step  # noqa: PLC0415
    from x2jax.train.step import batch_shardings, batch_spec  # noqa: PLC0415

    mesh = topology_mesh(topology_name, model=config.mesh.model if model is None else model)
    rules = ShardingRules.from_config(config.mesh.rules)
    step = build_step(config, mesh, rules, num_classes=num_classes, image_size=image_size,
                      total_steps=total_steps, platform="tpu")
    shardings = batch_shardings(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
             for k, v in batch_spec(config.data.batch_size, image_size).items()}
    return step.train_step.lower(step.abstract_state, batch).compile()


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVE_KINDS
    result: tuple[str, ...]  # HLO types, e.g. "f32[1024,32]"
    operands: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """Per-chip bytes of a compiled program and the collectives it issues."""

    memory: dict[str, int]  # arguments, outputs, temporaries, aliased, code
    collectives: tuple[Collective, ...]

    def counts(self) -> dict[str, int]:
        c = collections.Counter(x.kind for x in self.collectives)
        return {k: c[k] for k in COLLECTIVE_KINDS}

    def format(self) -> str:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        lines = ["per chip: " + ", ".join(f"{k} {mib(v)}" for k, v in self.memory.items())]
        for x in self.collectives:
            lines.append(f"  {x.kind}: {', '.join(x.operands)} -> {', '.join(x.result)}")
        return "\n".join(lines + ["collectives: " + ", ".join(f"{k} {v}" for k, v in self.counts().items())])


_TYPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*|c64|c128)\[([0-9,]*)\]")
# "%name = <result types> <opcode>(<operands>), attributes": an instruction of HLO text.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%\S+)\s*=\s*(.*?)\s([a-z][a-z0-9\-._]*)\(([^)]*)\)")


def hlo_types(text: str) -> tuple[str, ...]:
    """``"f32[1024,32]"``-style types in a piece of HLO text, in order."""
    return tuple(f"{m.group(1)}[{m.group(2)}]" for m in _TYPE.finditer(text))


class HloInstruction(NamedTuple):
    opcode: str  # "convolution", "all-gather-start", ...
    result: tuple[str, ...]  # its types, e.g. ("f32[1024,32]",)
    operands: tuple[str, ...]
    op_name: str  # the JAX op it came from (metadata), e.g. "jit(step)/jvp(IResNet)/conv1/conv_general_dilated"


def hlo_instructions(hlo_text: str) -> list[HloInstruction]:
    """Opcode, result and operand types and JAX op name of every instruction of HLO text.

    Optimized HLO names its operands without their types: those are looked up
    from the instructions (and parameters) that define them.
    """
    parsed, types = [], {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            name, result, opcode, operands = m.groups()
            types[name] = hlo_types(result)
            op_name = re.search(r'op_name="([^"]*)"', line)
            parsed.append((opcode, types[name], operands, op_name.group(1) if op_name else ""))
    out = []
    for opcode, result, operands, op_name in parsed:
        inline = hlo_types(operands)
        if not inline:
            inline = tuple(t for ref in re.findall(r"%[\w.\-]+", operands) for t in types.get(ref, ()))
        out.append(HloInstruction(opcode, result, inline, op_name))
    return out


def hlo_collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Every collective instruction of HLO text (an async ``-start`` counts once, its ``-done`` not)."""
    kinds = {k: k for k in COLLECTIVE_KINDS} | {k + "-start": k for k in COLLECTIVE_KINDS}
    return tuple(Collective(kinds[i.opcode], i.result, i.operands)
                 for i in hlo_instructions(hlo_text) if i.opcode in kinds)


def type_bytes(hlo_type: str) -> int:
    m = _TYPE.fullmatch(hlo_type)
    dtype, dims = m.group(1), [int(d) for d in m.group(2).split(",") if d]
    width = 1 if dtype in ("pred", "s8", "u8") or dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)) // 8
    n = 1
    for d in dims:
        n *= d
    return n * width


def summarize_compiled(compiled: Any) -> CompiledPlan:
    """Per-chip memory (``memory_analysis()``) and collectives (``as_text()``) of a compiled step."""
    m = compiled.memory_analysis()
    memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
              "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
              "code": m.generated_code_size_in_bytes}
    return CompiledPlan(memory, hlo_collectives(compiled.as_text()))


def main(argv: list[str] | None = None) -> None:
    """``python -m x2jax.tpu CONFIG TOPOLOGY --num-classes N --image-size S [key=value ...]``."""
    import argparse  # noqa: PLC0415

    from x2jax.train import config as config_lib  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m x2jax.tpu", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("topology")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=bfloat16")
    args = p.parse_intermixed_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no TPU is opened
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, args.overrides)
    compiled = compile_train_step(config, args.topology, num_classes=args.num_classes, image_size=args.image_size)
    print(f"{args.topology}: batch {config.data.batch_size}, {args.num_classes} classes")
    print(summarize_compiled(compiled).format())


if __name__ == "__main__":
    main()
