"""Compile the x2jax train step for a TPU topology on any host, no TPU needed.

With libtpu installed (``pip install 'x2jax[tpu]'``) JAX builds compile-only
devices for a named TPU slice ("deviceless AOT"); lowering the real train step
on abstract inputs over a mesh of them runs the TPU compiler here, and the
compiled program tells the per-chip memory, FLOPs and every collective it issues::

    mesh = topology_mesh("v5e:2x2")
    compiled = compile_train_step(config, "v5e:2x2", num_classes=1000, image_size=112)
    summary = summarize_compiled(compiled)  # .memory, .cost, .collectives

This is the compile layer of ``python -m x2jax.plan`` (:mod:`x2jax.plan`), which
turns it into a fit / FLOPs / collectives table.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import re
from typing import Any, NamedTuple, Sequence

import jax
from jax.sharding import Mesh

INSTALL_HINT = "pip install 'x2jax[tpu]'"
# Slices libtpu 0.0.42.1 builds here (each checked with get_topology_desc); any "<gen>:<AxB[xC]>" may work.
KNOWN_TOPOLOGIES = (
    "v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16",
    "v5p:1x1x1", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8", "v5p:8x8x8",
    "v5p:8x16x16", "v5p:16x16x16", "v5p:16x16x24",
    "v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16",
)
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Deviceless compiles on a host that is no TPU VM: libtpu otherwise warns about what it cannot find, and
# takes /tmp/libtpu_lockfile, so a second process (another plan, a train.py that probed the TPU plugin)
# could not load it at the same time; no TPU is opened, so sharing libtpu is safe.
_DEVICELESS_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
                          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Public per-chip figures of a TPU generation (bf16 peak, nominal HBM)."""

    name: str  # "v5e"
    device_kind: str  # jax Device.device_kind, e.g. "TPU v5 lite"
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


# Cloud TPU documentation, "TPU v5e" / "TPU v5p" / "TPU v6e" system-architecture tables
# (https://cloud.google.com/tpu/docs/v5e, .../v5p, .../v6e): peak bf16 compute, HBM capacity
# and bandwidth per chip. The v5e / v6e pages write 16 GB / 32 GB; the HBM is 16 / 32 GiB (the v5p
# page says 95 GiB). The compiler keeps part of it: it refuses v5e programs over 15.75 GiB.
CHIP_SPECS = {
    "TPU v5 lite": ChipSpec("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9),
    "TPU v5": ChipSpec("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": ChipSpec("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1640e9),
}


def chip_spec(device_kind: str) -> ChipSpec:
    """The :data:`CHIP_SPECS` entry of a ``device_kind``; ValueError naming the known kinds."""
    if device_kind not in CHIP_SPECS:
        raise ValueError(f"no chip figures for TPU device kind {device_kind!r}; "
                         f"known: {', '.join(f'{s.device_kind} ({s.name})' for s in CHIP_SPECS.values())}")
    return CHIP_SPECS[device_kind]


def known_topologies_text() -> str:
    """``"v5e: 1x1, 2x2, ...; v5p: ...; v6e: ..."`` for error messages."""
    by_gen: dict[str, list[str]] = {}
    for name in KNOWN_TOPOLOGIES:
        gen, shape = name.split(":")
        by_gen.setdefault(gen, []).append(shape)
    return "; ".join(f"{gen}: {', '.join(shapes)}" for gen, shapes in by_gen.items())


def _require_libtpu() -> None:
    try:
        importlib.import_module("libtpu")
    except ImportError as e:
        raise ImportError(f"compiling for a TPU topology needs libtpu (the tpu extra): {INSTALL_HINT}") from e


def topology_devices(topology_name: str) -> list[jax.Device]:
    """The compile-only devices of a TPU slice such as ``"v5e:2x2"`` (one per chip on v5e/v5p/v6e).

    Raises:
      ImportError: libtpu is not installed (``pip install 'x2jax[tpu]'``).
      ValueError: libtpu does not know ``topology_name`` (the message lists known names).
    """
    _require_libtpu()
    if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):  # not a TPU process: see _DEVICELESS_LIBTPU_ENV
        for key, value in _DEVICELESS_LIBTPU_ENV.items():
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
                         f"known to work: {known_topologies_text()}") from None


def check_one_device_per_chip(devices: Sequence[jax.Device], topology_name: str) -> None:
    """ValueError where a topology has more devices than chips (v4 megacore): no x2jax mesh."""
    if len({(d.process_index, tuple(d.coords)) for d in devices}) < len(devices):
        raise ValueError(f"TPU topology {topology_name!r} has {len(devices)} devices on fewer chips (megacore, "
                         f"e.g. v4): jax.make_mesh wants one device per chip; use v5e, v5p or v6e")


def topology_mesh(topology_name: str, *, model: int = 1) -> Mesh:
    """The ``("data", "model")`` x2jax mesh over a TPU topology's compile-only devices.

    Raises:
      ImportError: libtpu is not installed (``pip install 'x2jax[tpu]'``).
      ValueError: libtpu does not know ``topology_name``, it has two devices per chip (v4
        megacore), or ``model`` does not divide its chips.
    """
    from x2jax.parallel.mesh import make_mesh  # noqa: PLC0415

    devices = topology_devices(topology_name)
    check_one_device_per_chip(devices, topology_name)
    return make_mesh(data=-1, model=model, devices=devices)


@dataclasses.dataclass(frozen=True)
class TopologyStep:
    """A config's train step built over a TPU topology's compile-only devices, not yet compiled."""

    topology: str
    devices: list[jax.Device]
    mesh: Mesh
    rules: Any  # x2jax.parallel.sharding.ShardingRules
    step: Any  # x2jax.train.setup.Step (abstract_state, train_step, tx, ...)
    batch: dict[str, jax.ShapeDtypeStruct]  # abstract global batch with its shardings

    def lower(self) -> Any:
        return self.step.train_step.lower(self.step.abstract_state, self.batch)


def build_train_step(config: Any, topology_name: str, *, num_classes: int, image_size: int,
                     total_steps: int = 1000) -> TopologyStep:
    """``config``'s train step on ``topology_name``, built as ``train.py`` builds it.

    The mesh is :func:`x2jax.train.setup.make_run_mesh` over the topology's devices
    (``config.mesh``, checked against the batch and the topology's hosts); the step is
    :func:`x2jax.train.setup.build_step` for platform "tpu"; the batch is the abstract
    ``config.data.batch_size`` batch with the batch sharding. ``total_steps`` only
    shapes the learning-rate schedule.
    """
    from x2jax.parallel.sharding import ShardingRules  # noqa: PLC0415
    from x2jax.train.setup import build_step, make_run_mesh  # noqa: PLC0415
    from x2jax.train.step import batch_shardings, batch_spec  # noqa: PLC0415

    devices = topology_devices(topology_name)
    check_one_device_per_chip(devices, topology_name)
    rules = ShardingRules.from_config(config.mesh.rules)
    mesh = make_run_mesh(config, rules, devices=devices)
    step = build_step(config, mesh, rules, num_classes=num_classes, image_size=image_size,
                      total_steps=total_steps, platform="tpu")
    shardings = batch_shardings(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
             for k, v in batch_spec(config.data.batch_size, image_size).items()}
    return TopologyStep(topology_name, devices, mesh, rules, step, batch)


class HbmExhaustedError(RuntimeError):
    """The TPU compiler refused the program: it needs more HBM than a chip has."""

    def __init__(self, message: str, required_bytes: int | None, available_bytes: int | None):
        super().__init__(message)
        self.required_bytes, self.available_bytes = required_bytes, available_bytes


_SIZE = r"([0-9.]+)\s*([KMGT]?)(?:i?B)?"


def _size_bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "_KMGT".index(unit or "_"))  # XLA prints binary units ("15.75G")


def parse_hbm_exhausted(message: str) -> HbmExhaustedError | None:
    """An :class:`HbmExhaustedError` from a compiler RESOURCE_EXHAUSTED message (None for other errors).

    libtpu 0.0.42.1 says e.g. ``Ran out of memory on HBM, the total memory required for HLO
    temporaries (30.85G) exceeds available HBM (15.75G)``; sizes not found are None.
    """
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    first = next((line for line in message.splitlines() if "memory" in line.lower()), message.splitlines()[0])
    required = re.search(r"required[^(]*\(" + _SIZE + r"\)", message)
    available = re.search(r"available HBM\s*\(" + _SIZE + r"\)", message)
    return HbmExhaustedError(first.strip(), _size_bytes(*required.groups()) if required else None,
                             _size_bytes(*available.groups()) if available else None)


def compile_lowered(lowered: Any) -> Any:
    """``lowered.compile()``; a program too large for the chip raises :class:`HbmExhaustedError`."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        exhausted = parse_hbm_exhausted(str(e))
        if exhausted is None:
            raise
        raise exhausted from None


def compile_train_step(config: Any, topology_name: str, *, num_classes: int, image_size: int,
                       total_steps: int = 1000) -> Any:
    """``jax.stages.Compiled`` of ``config``'s full train step for ``topology_name``
    (:func:`build_train_step`, lowered and compiled; :class:`HbmExhaustedError` when it cannot fit)."""
    built = build_train_step(config, topology_name, num_classes=num_classes, image_size=image_size,
                             total_steps=total_steps)
    return compile_lowered(built.lower())


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVE_KINDS
    result: tuple[str, ...]  # HLO types, e.g. "f32[1024,32]"
    operands: tuple[str, ...]

    @property
    def result_bytes(self) -> int:
        return sum(type_bytes(t) for t in self.result)


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """Per-chip bytes, FLOPs and collectives of a compiled program (the per-device SPMD program)."""

    memory: dict[str, int]  # arguments, outputs, temporaries, aliased, code, peak
    collectives: tuple[Collective, ...]
    cost: dict[str, float] = dataclasses.field(default_factory=dict)  # flops, bytes accessed (per chip)

    def counts(self) -> dict[str, int]:
        c = collections.Counter(x.kind for x in self.collectives)
        return {k: c[k] for k in COLLECTIVE_KINDS}

    def collective_bytes(self) -> dict[str, int]:
        """Sum of the result bytes of each kind's collectives, per chip."""
        out = dict.fromkeys(COLLECTIVE_KINDS, 0)
        for x in self.collectives:
            out[x.kind] += x.result_bytes
        return out

    @property
    def total_bytes(self) -> int:
        """Per-chip HBM of the program: arguments + temporaries + outputs not aliased to (donated)
        arguments, or the compiler's peak where that is larger. For a large step the two agree
        (within 0.2 %); for tiny ones either can be the larger (single-chip programs report no
        temporaries, multi-chip ones more temporaries than their peak)."""
        m = self.memory
        return max(m.get("peak", 0), m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"])

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
    name: str = ""  # "%all-gather.4"
    operand_names: tuple[str, ...] = ()  # "%p.1", ... (empty where the operands are spelled with types)


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
            parsed.append((name, opcode, types[name], operands, op_name.group(1) if op_name else ""))
    out = []
    for name, opcode, result, operands, op_name in parsed:
        refs = tuple(re.findall(r"%[\w.\-]+", operands))
        inline = hlo_types(operands)
        if not inline:
            inline = tuple(t for ref in refs for t in types.get(ref, ()))
        out.append(HloInstruction(opcode, result, inline, op_name, name, refs))
    return out


def hlo_collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Every collective instruction of HLO text.

    An async pair counts once, at its ``-start``, with the result type of its ``-done``
    (a ``-start``'s own result also holds its operands).
    """
    kinds = {k: k for k in COLLECTIVE_KINDS} | {k + "-start": k for k in COLLECTIVE_KINDS}
    instructions = hlo_instructions(hlo_text)
    done = {i.operand_names[0]: i.result for i in instructions
            if i.opcode.endswith("-done") and i.opcode[:-5] in COLLECTIVE_KINDS and i.operand_names}
    return tuple(Collective(kinds[i.opcode], done.get(i.name, i.result) if i.opcode.endswith("-start") else i.result,
                            i.operands)
                 for i in instructions if i.opcode in kinds)


def type_bytes(hlo_type: str) -> int:
    m = _TYPE.fullmatch(hlo_type)
    dtype, dims = m.group(1), [int(d) for d in m.group(2).split(",") if d]
    width = 1 if dtype in ("pred", "s8", "u8") or dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)) // 8
    n = 1
    for d in dims:
        n *= d
    return n * width


def summarize_compiled(compiled: Any) -> CompiledPlan:
    """Per-chip memory (``memory_analysis()``), cost (``cost_analysis()``) and collectives (``as_text()``)."""
    m = compiled.memory_analysis()
    memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
              "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
              "code": m.generated_code_size_in_bytes, "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    cost = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in cost}
    return CompiledPlan(memory, hlo_collectives(compiled.as_text()), cost)
