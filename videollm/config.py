"""Config assembly and validation.

A user YAML has three roots, as in the original Video-LLaMA: ``model:``, ``datasets:`` and
``run:``. Assembly (``load_config``):

1. ``model``: the default YAML of ``model.arch`` for ``model.model_type``
   (``ModelClass.PRETRAINED_MODEL_CONFIG_DICT``) is merged *under* the user's section.
2. ``datasets``: for every dataset name, the builder's default YAML (``type`` selects one of
   ``BuilderClass.DATASET_CONFIG_DICT``, ``default`` otherwise) is merged under the user's entry.
3. ``run`` is taken as written, then ``--options key=value ...`` overrides are applied on top.

A path in the file's own ``model:`` section written as ``./...`` or ``../...`` is relative to the
folder of the config file (not to the working directory): an exported folder
(``python -m videollm.convert export``) names its parts that way, so it still works after being
moved or copied elsewhere. Other relative paths keep their meaning (the working directory).

Validation rejects unknown keys and wrong types with a :class:`~videollm.errors.ConfigError`
that names the full key and suggests the closest valid one. Schemas are dataclasses: the
model class's ``config_schema``, the builder's ``config_schema`` (with its ``BuildInfo``), the
processors' ``config_schema`` and :class:`RunConfig` here. A schema field may carry a range
(:func:`bounded`: ``run.init_lr`` > 0, ``run.grad_clip`` > 0 or null, batch sizes >= 1, ...),
checked with the types. The nested model dictionaries (``model.vit``, ``model.llm_config``, the
Q-Former and ImageBind overrides) and the structural constraints between keys (hidden sizes
divisible by heads, at least one query token, frames within the frame positions) are checked by
:mod:`videollm.validation`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from videollm.errors import ConfigError, closest
from videollm.registry import registry

logger = logging.getLogger(__name__)

ROOTS = ("model", "datasets", "run")
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number (None: no bound on that side); ``finite`` refuses inf and nan."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    finite: bool = True
    why: str = ""

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        return " and ".join(parts) or "finite"

    def check(self, value: Any, key: str) -> None:
        """Raise ConfigError naming ``key`` if the number ``value`` is outside the range (None passes)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        v = float(value)
        ok = not (self.finite and not math.isfinite(v))
        ok = ok and (self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
        ok = ok and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le)
        if not ok:
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(f"{key}: {value!r} is out of range; must be {self.describe()}{why}")


def bounded(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None,
            le: Optional[float] = None, why: str = "") -> Any:
    """A dataclass field with a default and an allowed range (checked by :func:`validate_mapping`)."""
    return field(default=default, metadata={"range": Range(gt=gt, ge=ge, lt=lt, le=le, why=why)})


def check_choice(value: Any, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{closest(value, choices)}")


@dataclass
class RunConfig:
    """Options of the ``run:`` section (runner, task, optimisation, output); numbers carry their
    allowed ranges (:func:`bounded`), checked when the config is validated."""

    task: str = "video_text_pretrain"
    runner: str = "runner_iter"
    # optimisation (the original's names)
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = bounded(1e-4, gt=0)
    min_lr: float = bounded(8e-5, ge=0)
    warmup_lr: float = bounded(1e-6, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    lr_decay_rate: Optional[float] = bounded(None, gt=0)
    weight_decay: float = bounded(0.05, ge=0)
    beta2: float = bounded(0.999, gt=0, lt=1)
    max_epoch: int = bounded(1, ge=1)
    iters_per_epoch: int = bounded(100, ge=1)
    batch_size_train: int = bounded(1, ge=1)
    batch_size_eval: int = bounded(1, ge=1)
    num_workers: int = bounded(0, ge=0)
    accum_grad_iters: int = bounded(1, ge=1)
    grad_clip: Optional[float] = bounded(None, gt=0, why="the maximum gradient norm; null disables clipping")
    seed: int = bounded(42, ge=0, lt=2**32, why="NumPy seeds are 32-bit")
    amp: bool = False
    amp_dtype: str = "bf16"
    vit_grad_checkpointing: bool = False
    llm_grad_checkpointing: bool = False
    # distribution
    device: str = "cpu"
    world_size: int = bounded(1, ge=1)
    dist_url: str = "env://"
    distributed: bool = False
    deepspeed_config: Optional[str] = None
    # output and checkpoints
    output_dir: str = "output/run"
    resume_ckpt_path: Optional[str] = None
    auto_resume: bool = False
    save_freq_iters: int = bounded(0, ge=0, why="0: only at epoch ends")
    keep_last_checkpoints: int = bounded(2, ge=0, why="0 keeps every checkpoint")
    # also write the frozen weights into checkpoint_N.pth (for models whose frozen parts are random,
    # e.g. the tiny recipes; released encoders are loaded from their own files instead)
    save_frozen_weights: bool = False
    # logging
    log_freq: int = bounded(10, ge=1)
    tensorboard: bool = False
    # experiment trackers beside log.jsonl: any of "tensorboard", "wandb" (WANDB_MODE=offline needs no network)
    report_to: List[str] = field(default_factory=list)
    wandb_project: str = "videollm"
    plot_curves: bool = True  # curves.png (loss and learning rate) in output_dir at the end of training
    max_nonfinite_in_row: int = bounded(5, ge=1)
    max_bad_sample_fraction: float = bounded(0.1, ge=0, le=1)
    # evaluation after training
    evaluate: bool = False
    eval_max_new_tokens: int = bounded(16, ge=1)
    eval_scorer: str = "synthetic_attributes"  # a registered scorer (registry.register_scorer)
    valid_every_epoch: bool = False  # evaluate valid_splits after every epoch
    keep_best_by: Optional[str] = None  # a metric: the best epoch is kept as checkpoint_best.pth
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    valid_splits: List[str] = field(default_factory=list)
    test_splits: List[str] = field(default_factory=list)
    job_name: Optional[str] = None


# ----------------------------------------------------------------------------------------
# Generic dataclass validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str) -> None:
    """Raise ConfigError if ``value`` (a plain python value) does not fit type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                _check_value(value, alt, key)
                return
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if value is None:
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        validate_mapping(value, tp, key)
        return
    if origin in (list, List, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args:
            for i, item in enumerate(value):
                _check_value(item, args[0], f"{key}[{i}]")
        return
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return
    raise ConfigError(f"{key}: unsupported schema type {tp!r}")


def validate_mapping(values: Dict[str, Any], schema: type, prefix: str) -> None:
    """Check every key of ``values`` against the dataclass ``schema``.

    Unknown keys and type mismatches raise ConfigError naming ``prefix.key``.
    """
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"{full}: unknown key{closest(key, list(fields))}")
        _check_value(value, hints[key], full)
        rng = fields[key].metadata.get("range") if key in fields else None
        if rng is not None:
            rng.check(value, full)


def _to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def with_defaults(values: Dict[str, Any], schema: type) -> Dict[str, Any]:
    """Return ``values`` completed with the schema's defaults (values must be validated)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.name in values:
            out[f.name] = values[f.name]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


# ----------------------------------------------------------------------------------------
# Assembly


def _load_yaml(path: os.PathLike | str) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping with model/datasets/run")
    return cfg


def parse_options(options: Optional[Sequence[str]]) -> DictConfig:
    """``["run.init_lr=1e-4", "model.max_txt_len=64"]`` (or ``key value`` pairs) -> DictConfig."""
    opts = list(options or [])
    if opts and "=" not in opts[0]:
        if len(opts) % 2:
            raise ConfigError(f"--options: expected key=value pairs, got {opts!r}")
        opts = [f"{k}={v}" for k, v in zip(opts[0::2], opts[1::2])]
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"--options: '{opt}' is not of the form key=value")
        key = opt.split("=", 1)[0]
        root = key.split(".", 1)[0]
        if root not in ROOTS:
            raise ConfigError(
                f"--options {key}: unknown root '{root}'{closest(root, ROOTS)}; "
                f"keys start with one of {', '.join(ROOTS)}"
            )
    try:
        return OmegaConf.from_dotlist(opts)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"--options: {exc}") from None


def default_model_config_path(model_cls: type, model_type: str) -> Path:
    presets = getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {})
    if model_type not in presets:
        raise ConfigError(
            f"model.model_type: unknown preset '{model_type}'{closest(model_type, presets)}; "
            f"presets of {model_cls.__name__}: {', '.join(sorted(presets))}"
        )
    return PACKAGE_DIR / presets[model_type]


def default_dataset_config_path(builder_cls: type, name: str, type_: str) -> Path:
    presets = getattr(builder_cls, "DATASET_CONFIG_DICT", {})
    if type_ not in presets:
        raise ConfigError(
            f"datasets.{name}.type: unknown '{type_}'{closest(type_, presets)}; "
            f"known: {', '.join(sorted(presets))}"
        )
    return PACKAGE_DIR / presets[type_]


def build_model_config(user_model: DictConfig) -> DictConfig:
    arch = user_model.get("arch")
    if arch is None:
        raise ConfigError("model.arch: missing (e.g. arch: video_llama)")
    model_cls = registry.get_model_class(str(arch))
    model_type = user_model.get("model_type") or getattr(model_cls, "DEFAULT_MODEL_TYPE", None)
    if model_type is None:
        if not getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", None):  # a model without presets
            return user_model
        raise ConfigError("model.model_type: missing (a preset name of the model)")
    default = _load_yaml(default_model_config_path(model_cls, str(model_type)))
    return OmegaConf.merge(default.get("model", OmegaConf.create()), user_model)


def build_dataset_config(user_datasets: DictConfig) -> DictConfig:
    out = OmegaConf.create()
    for name in user_datasets:
        builder_cls = registry.get_builder_class(str(name))
        entry = user_datasets[name] or OmegaConf.create()
        type_ = entry.get("type", "default")
        default_path = default_dataset_config_path(builder_cls, str(name), str(type_))
        default = _load_yaml(default_path).get("datasets", {}).get(name, OmegaConf.create())
        out[name] = OmegaConf.merge(default, entry)
    return out


def _validate_processors(node: Dict[str, Any], prefix: str) -> None:
    for split, proc in (node or {}).items():
        key = f"{prefix}.{split}"
        if proc is None:
            continue
        if not isinstance(proc, dict) or "name" not in proc:
            raise ConfigError(f"{key}: expected a mapping with a 'name' key")
        proc_cls = registry.get_processor_class(str(proc["name"]))
        schema = getattr(proc_cls, "config_schema", None)
        if schema is not None:
            validate_mapping(proc, schema, key)


def validate_config(cfg: DictConfig) -> None:
    """Validate an assembled config; raises ConfigError naming the first bad key."""
    for key in cfg:
        if key not in ROOTS:
            raise ConfigError(f"{key}: unknown root{closest(key, ROOTS)}; roots: {', '.join(ROOTS)}")
    model = _to_plain(cfg.get("model"))
    if model is not None:
        model_cls = registry.get_model_class(str(model.get("arch")))
        schema = getattr(model_cls, "config_schema", None)
        if schema is not None:
            validate_mapping(model, schema, "model")
    for name, entry in (_to_plain(cfg.get("datasets")) or {}).items():
        builder_cls = registry.get_builder_class(str(name))
        schema = getattr(builder_cls, "config_schema", None)
        if schema is not None:
            validate_mapping(entry or {}, schema, f"datasets.{name}")
        for proc_key in ("vis_processor", "text_processor"):
            _validate_processors((entry or {}).get(proc_key), f"datasets.{name}.{proc_key}")
    run = _to_plain(cfg.get("run"))
    if run is not None:
        validate_mapping(run, RunConfig, "run")
        check_choice(run.get("amp_dtype", RunConfig.amp_dtype), ("bf16", "fp16"), "run.amp_dtype")
        full = with_defaults(run, RunConfig)
        if full["lr_sched"] == "linear_warmup_cosine_lr" and full["min_lr"] > full["init_lr"]:
            logger.warning("run.min_lr %g is above run.init_lr %g: the schedule will raise the learning rate",
                           full["min_lr"], full["init_lr"])
        registry.get_task_class(str(run.get("task", RunConfig.task)))
        registry.get_lr_scheduler_class(str(run.get("lr_sched", RunConfig.lr_sched)))
    from videollm.validation import validate_cross_sections, validate_model_values

    if model is not None:
        validate_model_values(model, "model")
    validate_cross_sections(model, _to_plain(cfg.get("datasets")) or {})


def resolve_config_relative(section: Any, cfg_path: os.PathLike | str) -> None:
    """Make the ``./...`` / ``../...`` string values of ``section`` (one level) absolute, relative
    to the folder of ``cfg_path``; interpolations are left alone."""
    if not isinstance(section, DictConfig):
        return
    base = Path(cfg_path).resolve().parent
    for key in list(section.keys()):
        if OmegaConf.is_interpolation(section, key):
            continue
        value = section.get(key)
        if isinstance(value, str) and (value.startswith("./") or value.startswith("../")):
            section[key] = os.path.normpath(str(base / value))


def load_config(cfg_path: os.PathLike | str, options: Optional[Sequence[str]] = None) -> DictConfig:
    """Assemble, override and validate a config; see the module docstring."""
    user = _load_yaml(cfg_path)
    resolve_config_relative(user.get("model"), cfg_path)
    for key in user:
        if key not in ROOTS:
            raise ConfigError(f"{cfg_path}: {key}: unknown root{closest(key, ROOTS)}")
    overrides = parse_options(options)
    # The model preset may itself be overridden from the command line.
    user_model = OmegaConf.merge(user.get("model", OmegaConf.create()), overrides.get("model", {}))
    cfg = OmegaConf.create()
    if "model" in user or "model" in overrides:
        cfg.model = build_model_config(user_model)
    if "datasets" in user:
        cfg.datasets = build_dataset_config(user.datasets or OmegaConf.create())
    cfg.run = user.get("run", OmegaConf.create())
    cfg = OmegaConf.merge(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{cfg_path}: cannot resolve interpolation: {exc}") from None
    validate_config(cfg)
    run = _to_plain(cfg.run) or {}
    cfg.run = with_defaults(run, RunConfig)
    return cfg


def save_config(cfg: DictConfig, output_dir: os.PathLike | str, name: str = "config.yaml") -> Path:
    """Write the effective config into a run's output directory; returns the file path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    OmegaConf.save(cfg, path)
    return path


def add_common_args(parser) -> None:
    """``--cfg-path`` and ``--options``: shared by every entry script."""
    parser.add_argument("--cfg-path", required=True, help="path to the YAML config")
    parser.add_argument(
        "--options",
        nargs="+",
        default=None,
        help="override config keys: key=value ... (e.g. run.init_lr=1e-4)",
    )
