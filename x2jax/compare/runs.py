"""What a comparison trains: one config per (loss, seed), each run in its own workdir.

``plan_comparison(config, losses="x2_softmax,arcface", seeds=3, workdir=DIR)``
checks every loss and parameter before anything runs and returns the
:class:`Comparison`: runs ``DIR/runs/<loss label>/seed<s>``, loss-major.

- ``--losses`` items are registry names, each optionally with parameters,
  ``name:key=value:key=value`` (``arcface:margin=0.4``). A loss starts from its
  registry preset (``set_loss``); ``--config.loss.params.key=value`` overrides
  then apply to every loss, and the item's own ``key=value`` last.
- Seeds: run ``i`` of a loss has ``config.seed = base seed + i`` (the backbone
  and W initialisation and the step rng: dropout, Partial FC, ElasticFace). The
  data order is the base config's seed for every run (the "data seed"), so all
  runs of a comparison see the same batches in the same order (and can share a
  batched step); seed ``base`` of each loss is exactly ``train.py`` with that
  loss.
- ``DIR/comparison.json`` records the comparison; a rerun on ``DIR`` must ask
  for the same one (then every run resumes).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from x2jax import losses
from x2jax.train import config as config_lib

MANIFEST = "comparison.json"


@dataclasses.dataclass(frozen=True)
class LossChoice:
    """One loss of a comparison: ``label`` (as given in ``--losses``), registry ``name``, full ``params``."""

    label: str
    name: str
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run: its loss, seed, workdir and complete config."""

    loss: LossChoice
    seed: int
    workdir: Path
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.loss.label} seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every run of a comparison, loss-major, and what they share."""

    workdir: Path
    base: ml_collections.ConfigDict
    losses: tuple[LossChoice, ...]
    seeds: tuple[int, ...]
    data_seed: int
    runs: tuple[RunPlan, ...]

    def manifest(self) -> dict[str, Any]:
        """What ``comparison.json`` holds: the base config, losses, seeds, data seed."""
        return {
            "config": json.loads(self.base.to_json()),
            "losses": [dataclasses.asdict(lc) for lc in self.losses],
            "seeds": list(self.seeds),
            "data_seed": self.data_seed,
        }


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_losses(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"x2_softmax,arcface:margin=0.4"`` -> ``[(label, name, {key: value}), ...]``.

    Raises:
      config_lib.ConfigError: an empty list, an unknown loss (listing the known
        ones), a malformed ``key=value``, a parameter the loss does not take
        (listing those it takes), or a label given twice.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise config_lib.ConfigError("--losses: give at least one loss, e.g. --losses x2_softmax,arcface")
    out, seen = [], set()
    for item in items:
        name, *assignments = [part.strip() for part in item.split(":")]
        if name not in losses.NAMES:
            raise config_lib.ConfigError(f"--losses: unknown loss {name!r} in {item!r}; known: {', '.join(losses.NAMES)}")
        params = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key.strip():
                raise config_lib.ConfigError(f"--losses: {item!r}: parameters look like {name}:key=value, "
                                             f"got {assignment!r}")
            params[key.strip()] = _parse_value(value.strip())
        _check_params(name, params, where=f"--losses {item!r}")
        if item in seen:
            raise config_lib.ConfigError(f"--losses: {item!r} is given twice")
        seen.add(item)
        out.append((item, name, params))
    return out


def _check_params(name: str, params: dict[str, Any], *, where: str) -> None:
    accepted = losses.spec(name).params
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise config_lib.ConfigError(f"{where}: {name} takes no parameter {', '.join(map(repr, unknown))}; "
                                     f"it takes {', '.join(accepted) or 'none'}")


def split_loss_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(the overrides for ``load_config``, ``{param: value}`` of ``loss.params.*`` ones).

    Raises:
      config_lib.ConfigError: ``loss.name`` is overridden (the losses come from ``--losses``).
    """
    rest, params = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "loss.name":
            raise config_lib.ConfigError("--config.loss.name: a comparison takes its losses from --losses")
        if key.startswith("loss.params."):
            params[key[len("loss.params."):]] = _parse_value(value)
        else:
            rest.append(item)
    return rest, params


def run_dir(workdir: Path, label: str, seed: int) -> Path:
    """``<workdir>/runs/<label>/seed<seed>`` (``/`` in a label becomes ``_``)."""
    return Path(workdir) / "runs" / label.replace("/", "_") / f"seed{seed}"


def plan_comparison(base: ml_collections.ConfigDict, *, losses_text: str, num_seeds: int, workdir: str | Path,
                    loss_param_overrides: dict[str, Any] | None = None) -> Comparison:
    """Every run's config, checked (``config_lib.validate``) before any training.

    Args:
      base: the loaded config with the overrides applied (its loss is replaced).
      losses_text: the ``--losses`` value.
      num_seeds: seeds per loss (``--seeds``), >= 1.
      workdir: the comparison directory.
      loss_param_overrides: ``--config.loss.params.*`` values, applied to every loss.

    Returns:
      The :class:`Comparison`.

    Raises:
      config_lib.ConfigError: an unknown loss, a parameter a loss does not take,
        ``num_seeds < 1``, or any config error of a run (naming the run).
    """
    if num_seeds < 1:
        raise config_lib.ConfigError(f"--seeds must be >= 1, got {num_seeds}")
    workdir = Path(workdir)
    shared = dict(loss_param_overrides or {})
    choices, runs = [], []
    data_seed = int(base.seed)
    seeds = tuple(data_seed + i for i in range(num_seeds))
    for label, name, own in parse_losses(losses_text):
        _check_params(name, shared, where="--config.loss.params")
        config = base.copy_and_resolve_references()
        config_lib.set_loss(config, name)
        with config.loss.params.unlocked():
            for key, value in {**shared, **own}.items():
                config.loss.params[key] = value
        choice = LossChoice(label, name, config.loss.params.to_dict())
        choices.append(choice)
        for seed in seeds:
            run_config = config.copy_and_resolve_references()
            run_config.seed = seed
            try:
                config_lib.validate(run_config)
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"run {label} seed {seed}: {e}") from None
            runs.append(RunPlan(choice, seed, run_dir(workdir, label, seed), run_config))
    return Comparison(workdir, base, tuple(choices), seeds, data_seed, tuple(runs))


def check_manifest(comparison: Comparison) -> None:
    """Checks that the ``comparison.json`` there (if any) describes this comparison, then writes it.

    Raises:
      config_lib.ConfigError: the directory holds another comparison (naming what differs).
    """
    path = comparison.workdir / MANIFEST
    now = comparison.manifest()
    if path.is_file():
        saved = json.loads(path.read_text())
        diffs = [f"{key}: {json.dumps(saved.get(key))} -> {json.dumps(now[key])}"
                 for key in ("losses", "seeds", "data_seed") if saved.get(key) != json.loads(json.dumps(now[key]))]
        # the settings a resumed run must keep (config.RESUME_KEYS); the length may grow, paths move
        diffs += config_lib.resume_differences(saved.get("config", {}), comparison.base)
        if diffs:
            raise config_lib.ConfigError(
                f"{comparison.workdir} holds another comparison ({path}: {'; '.join(diffs)}); "
                "rerun it with its own settings to resume, or use another --workdir")
    comparison.workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(now, indent=1) + "\n")
    tmp.replace(path)
