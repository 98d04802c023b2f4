"""Training configuration: the schema with defaults, loading, overrides, validation.

Config files in ``configs/`` are small Python files with ``get_config(arg)`` that
start from :func:`base_config` (every key the trainer reads, with defaults)
and change what their recipe needs; the optional ``arg`` (``file.py:arcface``)
picks a variant, such as the loss. ml_collections' config flags load them and
parse ``--config.optimizer.lr=0.05`` style overrides to the type of the existing
value. The config is locked: assigning a key it does not have raises, in files
and on the command line alike. :func:`validate` checks everything that can be
checked before devices are touched or anything compiles.
"""

from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from x2jax import losses

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file, override or value that cannot run, named with its key."""

DATASETS = ("synthetic", "insightface_rec", "image_folder", "tfds")


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults (the CPU default run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data: name in DATASETS; path: dataset directory (insightface_rec: train.rec/idx/property;
    # image_folder: root/<identity>/<image>) or, for tfds, "builder/config" (e.g.
    # "insightface_rec/ms1mv3") prepared in tfds_data_dir; variant: synthetic config name.
    c.data = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            variant="small",
            path="",
            tfds_data_dir="",
            batch_size=128,  # global batch (all devices and processes)
            flip=True,
            worker_count=0,
            on_corrupt="skip",  # 'skip' (counted) or 'raise'
            # synthetic only: override the variant's size (0 = the variant's value)
            num_identities=0,
            images_per_identity=0,
            image_size=0,
            # synthetic only (docs/data.md): family_size > 1 groups identities into families whose
            # latents are pulled to a shared centre by family_similarity in [0, 1) (0: unrelated), and
            # splits verification negatives into hard (same family) and easy; zipf_exponent > 0:
            # long-tailed images per identity (0: images_per_identity each). Defaults: today's data.
            family_size=1,
            family_similarity=0.0,
            zipf_exponent=0.0,
        )
    )
    # layers / widths: override the architecture's stages (() = the named architecture's).
    # remat: gradient checkpointing ("none", "blocks" or a policy name); batch_norm: training
    # statistics over the "global" batch or per device ("local", as torch DDP).
    c.model = ml_collections.ConfigDict(
        dict(name="r18_tiny", embedding_size=128, dtype="float32", conv_impl="auto", dropout=0.0, layers=(), widths=(),
             remat="none", batch_norm="global")
    )
    # Loss: a name from x2jax.losses.NAMES and its keyword params; sample_rate < 1 is Partial FC.
    # head_update: "auto" (row-sparse when sample_rate < 1 with SGD: only the sampled rows of W are
    # gathered, differentiated and updated), "sparse" (require it) or "dense" (dense W gradient, masked
    # update); head_store_dtype: W's storage ("float32" or "bfloat16", row-sparse only, updates in fp32).
    c.loss = ml_collections.ConfigDict(
        dict(name="x2_softmax", params=ml_collections.ConfigDict(dict(scale=64.0, a=-0.9, h=0.0, k=0.65)), sample_rate=1.0,
             head_update="auto", head_store_dtype="float32")
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="sgd",
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=5.0,  # backbone only; 0 disables
            accumulate_steps=1,
            head_momentum_dtype="float32",  # W's momentum storage: "bfloat16" with the row-sparse head only
        )
    )
    c.schedule = ml_collections.ConfigDict(
        dict(
            name="polynomial",
            lr=0.1,
            warmup_steps=0,
            warmup_epochs=0.0,  # or the warm-up in epochs (with num_epochs): follows the batch size
            boundaries=(0.5, 0.75, 0.9),  # step: fractions of the run (or absolute steps if > 1)
            decay_factor=0.1,
            power=2.0,
            end_lr=0.0,
        )
    )
    c.num_steps = 0  # exactly one of num_steps / num_epochs is > 0
    c.num_epochs = 0.0
    # num_devices: use the first N devices (0 = all), e.g. to resume on fewer devices.
    # rules: logical axis -> comma-separated mesh axes ("" = replicated); see x2jax/parallel/sharding.py.
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, model=1, num_devices=0, param_sharding="replicate",
        rules=ml_collections.ConfigDict(dict(batch="data", classes="data,model", embed="", fsdp="data")),
    ))
    # Multi-host: initialization_timeout_s bounds the wait for every process to join;
    # heartbeat_timeout_s how long a silent (dead) peer goes unnoticed once running.
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto_detect=False,
             initialization_timeout_s=300, heartbeat_timeout_s=100)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every_steps = 50
    # Verification every N steps (0: only at the end) on comma-separated sets:
    # 'synthetic' (held-out synthetic identities) or .bin names (lfw, cfp_fp, ...) under data_dir.
    c.eval = ml_collections.ConfigDict(dict(every_steps=0, sets="synthetic", data_dir="", batch_size=256))
    c.on_nonfinite = "stop"  # 'stop' (error naming the step) or 'skip' (the step changes nothing)
    # A resume whose loss, batch size, seed, optimizer, schedule or data differ from the
    # checkpoint's run: 'error', or 'allow' (a deliberate change, listed when it resumes).
    c.resume_mismatch = "error"
    c.compilation_cache_dir = "~/.cache/x2jax/jax_cache"  # "" disables the persistent cache
    c.lock()
    return c


def set_loss(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set ``config.loss`` to ``name`` with its preset parameters (``losses.spec(name).preset``).

    Raises:
      ValueError: an unknown loss name.
    """
    preset = dict(losses.spec(name).preset)
    config.loss.name = name
    config.loss.params = ml_collections.ConfigDict(preset)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config of ``file.py`` or ``file.py:arg``, with ``key.sub=value`` overrides.

    ml_collections' own flags load it: ``config_flags.DEFINE_config_file(lock_config=True)``
    calls ``get_config()`` (``get_config(arg)`` after a colon); the file may import sibling
    files of its folder. Overrides then go through :func:`apply_overrides`.

    Raises:
      FileNotFoundError: no such file.
      ConfigError: the file fails to import, has no ``get_config``, ``get_config(arg)``
        fails, or it does not return a ConfigDict; a bad override.
    """
    from absl import flags  # noqa: PLC0415 (the train extra)
    from ml_collections import config_flags  # noqa: PLC0415

    path = str(path)
    file_name, _, arg = path.partition(":") if ":" in Path(path).name else (path, "", "")
    file = Path(file_name)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} not found")
    argv = ["x2jax", f"--config={path}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    folder = str(file.parent.absolute())
    sys.path.insert(0, folder)  # configs may import their siblings
    sys.modules.pop("config_config", None)  # config_flags re-executes into a cached module otherwise
    try:
        with warnings.catch_warnings():  # config_flags imports with SourceFileLoader.load_module()
            warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
            values(argv)
            config = values.config
    except flags.Error as e:  # get_config raised: config_flags wraps it with a traceback
        last = str(e).strip().splitlines()[-1]
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {call} failed: {last}") from None
    except SyntaxError as e:
        raise ConfigError(f"config file {file}: syntax error line {e.lineno}: {e.msg}") from None
    except AttributeError as e:  # no get_config, or get_config() set a key the schema lacks
        if "get_config" in str(e):
            raise ConfigError(f"config file {file} has no get_config()") from None
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {call} failed: {e}") from None
    except OSError as e:  # the import failed (config_flags defers its IOError to the first access)
        raise ConfigError(f"config file {file} could not be loaded: {e.__cause__ or e}") from None
    except Exception as e:  # noqa: BLE001 (anything the file raises while it is imported)
        raise ConfigError(f"config file {file} could not be loaded: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
        sys.modules.pop("config_config", None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config() must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    return apply_overrides(config, overrides)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple", list: "a list"}


def _check_override_key(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether ``key`` exists; False for a new ``loss.params`` keyword. Raises naming the known keys."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if parts[:i] == ["loss", "params"] and i == len(parts) - 1 and part not in node:
            return False  # margin-function keywords: any name (validate() checks it against the loss)
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "<top level>"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} (known: {', '.join(known)})")
        node = node[part]
    return True


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``key.sub=value`` strings with ml_collections' config flags (in place).

    Each value is parsed to the type of the key's current value, as
    ``--config.key=value`` on a ``config_flags`` command line (tuples as ``1,2`` or
    ``(1, 2)``; booleans as true/false/1/0). ``loss.params`` may gain keywords
    (:func:`validate` checks them against the loss).

    Raises:
      ConfigError: a malformed override, an unknown key (naming the known ones), or a
        value that does not parse as the key's type.
    """
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    existing = []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"config override {item!r} must look like key.sub=value")
        if _check_override_key(config, key):
            existing.append((key, text))
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            with config.loss.params.unlocked():
                config.loss.params[key.split(".")[-1]] = value
    if not existing:
        return config
    argv = ["x2jax"] + [f"--config.{key}={text}" for key, text in existing]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        key = next((k for k, _ in existing if f"--config.{k}=" in str(e)), None)
        if key is None:
            raise ConfigError(f"config overrides: {e}") from None
        current = config
        for part in key.split("."):
            current = current[part]
        text = dict(existing)[key]
        expected = _TYPE_NAMES.get(type(current), type(current).__name__)
        raise ConfigError(f"--config.{key}: expected {expected}, got {text!r}") from None
    return values.config


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(schema.keys()))})")
        if isinstance(schema[key], ml_collections.ConfigDict) and key != "params":
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a group of keys")
            _check_keys(config[key], schema[key], name + ".")


def row_sparse_head(config: ml_collections.ConfigDict) -> bool:
    """Whether the step updates W row-sparsely (Partial FC with SGD, ``loss.head_update`` not 'dense')."""
    return (config.loss.sample_rate < 1.0 and config.optimizer.name == "sgd"
            and config.loss.head_update in ("auto", "sparse"))


def validate(config: ml_collections.ConfigDict) -> None:
    """Check a config without touching devices; raises ``ValueError`` naming the key."""
    from x2jax.models.layers import CONV_IMPLS, REMAT_CHOICES  # noqa: PLC0415 (keeps losses import light)
    from x2jax.models.registry import NAMES as MODEL_NAMES  # noqa: PLC0415
    from x2jax.train.optimizer import OPTIMIZERS, SCHEDULES  # noqa: PLC0415

    _check_keys(config, base_config())
    d, m, lo = config.data, config.model, config.loss
    if d.name not in DATASETS:
        raise ConfigError(f"data.name must be one of {DATASETS}, got {d.name!r}")
    if d.name != "synthetic":
        if not d.path:
            raise ConfigError(f"data.path is required for data.name={d.name!r}")
        if d.name != "tfds" and not Path(os.path.expanduser(d.path)).exists():
            raise ConfigError(f"data.path {d.path!r} does not exist")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
    if d.on_corrupt not in ("skip", "raise"):
        raise ConfigError(f"data.on_corrupt must be 'skip' or 'raise', got {d.on_corrupt!r}")
    _validate_synthetic_shape(config)
    if m.name not in MODEL_NAMES:
        raise ConfigError(f"model.name {m.name!r} unknown; known: {', '.join(MODEL_NAMES)}")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")
    if m.conv_impl not in CONV_IMPLS:
        raise ConfigError(f"model.conv_impl must be one of {sorted(CONV_IMPLS)}, got {m.conv_impl!r}")
    if m.remat not in REMAT_CHOICES:
        raise ConfigError(f"model.remat must be one of {REMAT_CHOICES}, got {m.remat!r}")
    if m.batch_norm not in ("global", "local"):  # x2jax.models.iresnet.BATCH_NORMS
        raise ConfigError(f"model.batch_norm must be 'global' or 'local', got {m.batch_norm!r}")
    if config.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name must be one of {SCHEDULES}, got {config.schedule.name!r}")
    if config.optimizer.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}")
    if config.resume_mismatch not in ("error", "allow"):
        raise ConfigError(f"resume_mismatch must be 'error' or 'allow', got {config.resume_mismatch!r}")
    if config.mesh.num_devices < 0:
        raise ConfigError(f"mesh.num_devices must be >= 0 (0 = all devices), got {config.mesh.num_devices}")
    d_ = config.distributed
    if d_.initialization_timeout_s < 1 or d_.heartbeat_timeout_s < 1:
        raise ConfigError("distributed.initialization_timeout_s and distributed.heartbeat_timeout_s must be >= 1 s, "
                         f"got {d_.initialization_timeout_s} and {d_.heartbeat_timeout_s}")
    accepted = set(losses.spec(lo.name).params)
    unknown = set(lo.params.keys()) - accepted
    if unknown:
        raise ConfigError(f"loss.params {sorted(unknown)} not accepted by {lo.name}; accepted: {sorted(accepted)}")
    if not 0.0 < lo.sample_rate <= 1.0:
        raise ConfigError(f"loss.sample_rate must be in (0, 1], got {lo.sample_rate}")
    if lo.sample_rate < 1.0 and config.optimizer.accumulate_steps > 1:
        raise ConfigError("loss.sample_rate < 1 with optimizer.accumulate_steps > 1 is not supported")
    if lo.head_update not in ("auto", "sparse", "dense"):
        raise ConfigError(f"loss.head_update must be 'auto', 'sparse' or 'dense', got {lo.head_update!r}")
    for key, value in (("loss.head_store_dtype", lo.head_store_dtype),
                       ("optimizer.head_momentum_dtype", config.optimizer.head_momentum_dtype)):
        if value not in ("float32", "bfloat16"):
            raise ConfigError(f"{key} must be 'float32' or 'bfloat16', got {value!r}")
    sparse_possible = lo.sample_rate < 1.0 and config.optimizer.name == "sgd"
    if lo.head_update == "sparse" and not sparse_possible:
        raise ConfigError("loss.head_update='sparse' needs loss.sample_rate < 1 and optimizer.name='sgd', got "
                          f"{lo.sample_rate} and {config.optimizer.name!r}")
    if "bfloat16" in (lo.head_store_dtype, config.optimizer.head_momentum_dtype) and not row_sparse_head(config):
        raise ConfigError("loss.head_store_dtype / optimizer.head_momentum_dtype 'bfloat16' need the row-sparse "
                          "head: loss.sample_rate < 1, optimizer.name='sgd' and loss.head_update 'auto' or 'sparse'")
    if (config.num_steps > 0) == (config.num_epochs > 0):
        raise ConfigError(f"set exactly one of num_steps ({config.num_steps}) and num_epochs ({config.num_epochs})")
    if config.num_steps > 0 and not 0 <= config.schedule.warmup_steps < config.num_steps:
        raise ConfigError(f"schedule.warmup_steps={config.schedule.warmup_steps} must be in "
                         f"[0, num_steps={config.num_steps})")
    warmup_epochs = config.schedule.warmup_epochs
    if warmup_epochs and (config.schedule.warmup_steps or not 0 < warmup_epochs < config.num_epochs):
        raise ConfigError(f"schedule.warmup_epochs={warmup_epochs} needs schedule.warmup_steps=0 and num_epochs > "
                          f"warmup_epochs (got warmup_steps={config.schedule.warmup_steps}, "
                          f"num_epochs={config.num_epochs})")
    if config.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {config.on_nonfinite!r}")
    from x2jax.parallel.sharding import ShardingRules  # noqa: PLC0415

    try:
        rules = ShardingRules.from_config(config.mesh.rules)
    except ValueError as e:
        raise ConfigError(f"mesh.rules: {e}") from None
    if not rules.batch:
        raise ConfigError("mesh.rules.batch must name at least one mesh axis (the batch is split over it)")
    if config.mesh.param_sharding not in ("replicate", "fsdp"):
        raise ConfigError(f"mesh.param_sharding must be 'replicate' or 'fsdp', got {config.mesh.param_sharding!r}")
    if config.log_every_steps < 1 or config.checkpoint.every_steps < 1:
        raise ConfigError("log_every_steps and checkpoint.every_steps must be >= 1")
    from x2jax.evaluation.sets import resolve_verification_sets  # noqa: PLC0415

    try:  # every set located (a .bin or a prepared TFDS set) before any data work
        resolve_verification_sets([s.strip() for s in config.eval.sets.split(",") if s.strip()],
                                  data_dir=config.eval.data_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"eval set: {e}") from None


def _validate_synthetic_shape(config: ml_collections.ConfigDict) -> None:
    """data.family_size / family_similarity / zipf_exponent, and the eval sets that need families."""
    from x2jax.data import synthetic  # noqa: PLC0415
    from x2jax.evaluation import sets  # noqa: PLC0415

    d = config.data
    if d.family_size < 1:
        raise ConfigError(f"data.family_size must be >= 1 (1 = independent identities), got {d.family_size}")
    if not 0.0 <= d.family_similarity < 1.0:
        raise ConfigError(f"data.family_similarity must be in [0, 1) (0 = unrelated family members, "
                          f"near 1 = near-duplicates), got {d.family_similarity}")
    if d.family_similarity > 0 and d.family_size == 1:
        raise ConfigError(f"data.family_similarity={d.family_similarity} needs data.family_size > 1")
    if not 0.0 <= d.zipf_exponent <= synthetic.MAX_ZIPF_EXPONENT:
        raise ConfigError(f"data.zipf_exponent must be in [0, {synthetic.MAX_ZIPF_EXPONENT}] "
                          f"(0 = images_per_identity each), got {d.zipf_exponent}")
    shaped = [k for k, default in sets.SHAPE_FIELDS.items() if d[k] != default]
    if d.name != "synthetic" and shaped:
        raise ConfigError(f"data.{shaped[0]} applies to synthetic data only (data.name={d.name!r})")
    if d.name == "synthetic":
        try:  # the variant exists and the sizes fit the families (no family spans train and verification)
            ref = sets.SyntheticSetRef.from_data_config(d)
            synthetic.get_config(ref.variant, **dict(ref.overrides))
        except ValueError as e:
            raise ConfigError(f"data (synthetic variant {d.variant!r}): {e}") from None
    subsets = [s.strip() for s in config.eval.sets.split(",") if s.strip() in sets.SYNTHETIC_SUBSETS]
    if subsets and (d.name != "synthetic" or d.family_size < 2):
        raise ConfigError(f"eval set {subsets[0]!r} needs synthetic data with families "
                          f"(data.family_size > 1), got data.name={d.name!r}, data.family_size={d.family_size}")


# What a resume must agree on with the checkpoint's run (besides the model and class count).
# The run length (num_steps / num_epochs) may grow; data paths and loader settings may move.
RESUME_KEYS = (
    "seed", "loss", "optimizer", "schedule", "data.name", "data.variant", "data.batch_size", "data.flip",
    "data.num_identities", "data.images_per_identity", "data.image_size",
    "data.family_size", "data.family_similarity", "data.zipf_exponent",
)


def resume_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """``"key: saved -> now"`` for each :data:`RESUME_KEYS` entry where a checkpoint's config differs.

    ``saved`` is the checkpoint's config as JSON. A key it lacks inside a compared group
    (``loss``, ``optimizer``, ``schedule``: a key added after the checkpoint was written)
    takes :func:`base_config`'s default, the behaviour of the code that wrote it; a
    ``loss.params`` key it lacks, or a whole key, is not compared.
    """
    import json  # noqa: PLC0415

    now = json.loads(config.to_json())
    saved = _with_defaults(saved, json.loads(base_config().to_json()))
    diffs = []
    for key in RESUME_KEYS:
        a, b, present = saved, now, True
        for part in key.split("."):
            present = present and isinstance(a, dict) and part in a
            a, b = (a.get(part) if isinstance(a, dict) else None), b[part]
        if present and a != b:
            diffs.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs


def _with_defaults(saved: Any, defaults: Any, path: str = "") -> Any:
    """``saved`` with the keys it lacks filled from ``defaults``, inside dicts that it has."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict) or path == "loss.params":
        return saved
    out = dict(saved)
    for key, value in defaults.items():
        sub = f"{path}.{key}" if path else key
        if key in out:
            out[key] = _with_defaults(out[key], value, sub)
        elif path and sub != "loss.params":
            out[key] = value
    return out


def validate_for_devices(config: ml_collections.ConfigDict, *, batch_shards: int, process_count: int) -> None:
    """Checks that need the mesh: the global batch splits over devices and processes."""
    b = config.data.batch_size
    if b % batch_shards:
        raise ConfigError(f"data.batch_size={b} is not divisible by the {batch_shards} devices of the batch axis")
    if b % process_count:
        raise ConfigError(f"data.batch_size={b} is not divisible by the {process_count} processes")
    if config.eval.batch_size % batch_shards:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} is not divisible by {batch_shards} devices")
