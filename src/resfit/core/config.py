"""Training configuration: frozen sections, each option described once.

A :class:`TrainConfig` is made of sections (``data``, ``model``, ``optim``, ``augment``,
``transfer``, ``runtime``, ``run``). Every option is a dataclass field whose metadata holds its
help text, its choices and whether a resumed run may change it; the CLI and the checks are
generated from that metadata, so a choice list lives here and nowhere else.

Configs are immutable: :meth:`TrainConfig.replace` and :func:`resfit.core.defaults.resolve_config`
return new objects. Options are addressed by a flat name that is unique across sections (``lr``,
``freeze``, ``data``), which is what ``resfit.train(...)`` keywords, CLI flags and the run's
``config.json`` use.

This is the schema. The default policy (what resolving fills in) is :mod:`resfit.core.defaults`,
the augmentation presets :mod:`resfit.core.presets`, and what ``--resume`` may change
:mod:`resfit.core.resume`. Imports nothing of resfit but the error types and the presets (no
torch: ``resfit --help`` answers at once).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .choices import (  # re-exported: the options' choice lists
    BALANCE,
    CACHE_CHOICES,
    CACHE_DTYPES,
    DATA_MODES,
    FREEZE_CHOICES,
    LEAKAGE,
    LEAKAGE_SIGNALS,
    MULTILABEL_LOSSES,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    TASKS,
    TRACKERS,
    TRAIN_PRECISIONS,
    UNFREEZE,
    UNKNOWN_SCORES,
)
from .choices import (
    EXPORT_FORMATS as EXPORT_FORMATS,  # for resfit export (not an option here)
)
from .errors import ConfigError
from .presets import (
    AUGMENT_CHOICES,
    PRESET_VALUES,
    SHORT_SCRATCH_EPOCHS,
    SMALL_IMAGE,
    SMALL_IMAGE_CROP,
    auto_preset,
)
from .windows import parse_window, window_value


@dataclass(frozen=True)
class AugmentConfig:
    """The knobs behind the presets; ``None`` means "the preset's value"."""

    preset: str = "auto"
    hflip: float | None = None  # probability
    vflip: float | None = None  # probability (off by default: not for natural photos)
    crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range
    rotation: float | None = None  # degrees, +/-
    translate: float | None = None  # fraction of the size
    zoom: tuple[float, float] | None = None  # scale range of the affine
    color_jitter: float | None = None  # brightness/contrast/saturation strength
    policy: str | None = None  # "trivialaugment" | "randaugment" | "none"
    erasing: float | None = None  # probability
    mixup: float | None = None  # alpha, 0 = off
    cutmix: float | None = None  # alpha, 0 = off

    def resolved(self, img_size: int | None = None, short_scratch: bool = False) -> AugmentConfig:
        """Every knob filled from the preset (``auto``: the preset :func:`auto_preset` picks)."""
        if self.preset not in AUGMENT_CHOICES:
            raise ConfigError(
                f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got {self.preset!r}"
            )
        c = self.settled(img_size, short_scratch)
        base = PRESET_VALUES[c.preset]
        values = {f.name: getattr(c, f.name) for f in fields(c)}
        for k, v in base.items():
            if values[k] is None:
                values[k] = v
        return AugmentConfig(**values)

    def settled(self, img_size: int | None, short_scratch: bool = False) -> AugmentConfig:
        """``auto`` made concrete (:func:`auto_preset`): the preset, and at small sizes the
        milder crops unless given; any other preset as it is."""
        if self.preset != "auto":
            return self
        preset = auto_preset(img_size, short_scratch)
        crop = self.crop_scale
        if preset == "light" and crop is None:
            crop = SMALL_IMAGE_CROP
        return dataclasses.replace(self, preset=preset, crop_scale=crop)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self.resolved())


def option(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    positive: bool = False,
    resumable: bool = False,
    name: str | None = None,
    cli: bool = True,
    metavar: str | None = None,
    parse: str | None = None,
) -> Any:
    """A config field with what the CLI and the checks need to know about it.

    ``resumable``: ``--resume`` may change it (epochs, progress ...); any other option given
    with ``--resume`` must equal the run's. ``name``: the flat option name when it differs from
    the field's. ``minimum``: the smallest allowed value (inclusive); ``positive``: above 0.
    ``parse``: a key of :data:`PARSERS` for a value that is not one plain type (``--lr auto``).
    """
    meta = dict(help=help, choices=choices, minimum=minimum, positive=positive,
                resumable=resumable, name=name, cli=cli, metavar=metavar, parse=parse)  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split."""

    path: str = option("", "image folder (train/ val/ test/ or class folders) or a CSV manifest",
                       name="data", resumable=True)  # fmt: skip
    val_fraction: float = option(0.15, "share of train held out for validation when there is no val/ folder")  # fmt: skip
    test_fraction: float = option(0.0, "share held out for test when there is no test/ folder")
    task: str = option("auto", "single: one label per image; multilabel: any number (sigmoid outputs); auto: multilabel when the manifest has a labels column", choices=TASKS)  # fmt: skip
    balance: str | None = option(None, "for uneven classes: weight the loss, or draw classes evenly (multilabel: weights only, as positive weights per class)", choices=BALANCE)  # fmt: skip
    leakage: str = option("report", "duplicates across splits: report them, remove them from val/test, or skip the check", choices=LEAKAGE)  # fmt: skip
    leakage_signal: str = option("phash", "how the leakage check finds duplicates: perceptual hashes, or both hashes and the --weights' embeddings (also finds crops, rotations, mirror images; a forward pass per image)", choices=LEAKAGE_SIGNALS)  # fmt: skip
    data_mode: str = option("auto", "where the images live during training: memory decodes each once, stream decodes on the fly in the workers, shards streams a folder written by resfit prepare, auto picks memory when it fits with room to spare (and shards for a prepared folder)", choices=DATA_MODES)  # fmt: skip
    workers: int = option(0, "processes for decoding (stream) and augmentation (0 keeps the cores for the model)", minimum=0, resumable=True)  # fmt: skip
    limit_train_batches: int | None = option(None, "train on at most this many batches per epoch (smoke runs)", minimum=1, metavar="N")  # fmt: skip
    limit_val_batches: int | None = option(None, "validate on at most this many batches (a seeded subset of val; smoke runs)", minimum=1, metavar="N")  # fmt: skip
    window: str | None = option(None, "DICOM and 16-bit PNG/TIFF: the intensity window LEVEL,WIDTH (e.g. 40,400) or a preset: lung, bone, soft-tissue, brain (default: the DICOM file's own window, else the whole range)", parse="window", metavar="L,W")  # fmt: skip
    group_by: str | None = option(None, "keep each group in one split: a manifest column or a DICOM tag (default: PatientID when the files are DICOM and carry it)", metavar="COLUMN")  # fmt: skip
    slice_by: str | None = option(None, "report metrics per group of this manifest column or DICOM tag (e.g. Manufacturer) for val/test", metavar="COLUMN", resumable=True)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The network and what it starts from."""

    arch: str = option("resnet18", "architecture; `resfit models` lists them")
    weights: str | None = option(None, "pretrained weights: a registered name, 'pretrained', or a file")  # fmt: skip
    in_chans: int = option(3, "input channels (1: the luminance of the image)", choices=(1, 3))
    img_size: int | None = option(None, "input size (default: the weights', else 224, or 32 for CIFAR nets)", minimum=8)  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, the learning-rate schedule and the loss's regularisers."""

    epochs: int = option(20, "epochs to train", minimum=1, resumable=True)
    batch_size: int = option(64, "global batch (split across ranks under torchrun)", minimum=1)
    optimizer: str = option("sgd", "the optimizer", choices=OPTIMIZERS)
    lr: float | str | None = option(None, "peak learning rate, or auto: a short LR-finder sweep before training picks it (RUN/lr_find.png); default: by optimizer, batch and recipe (the defaults table in docs/guide/training.md)", positive=True, parse="lr")  # fmt: skip
    momentum: float = option(0.9, "SGD momentum", minimum=0.0)
    nesterov: bool = option(True, "Nesterov momentum for SGD")
    weight_decay: float | None = option(None, "weight decay (default: 5e-4 SGD, 0 Adam, 0.05 AdamW)", minimum=0.0)  # fmt: skip
    schedule: str = option("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "epochs of linear warm-up", minimum=0.0)
    label_smoothing: float = option(0.1, "label smoothing of the loss", minimum=0.0)
    multilabel_loss: str = option("bce", "multilabel: binary cross-entropy, or the asymmetric loss (ASL) that down-weights easy negatives", choices=MULTILABEL_LOSSES)  # fmt: skip
    grad_clip: float | None = option(None, "clip the global gradient norm to this value", positive=True)  # fmt: skip


@dataclass(frozen=True)
class TransferConfig:
    """What is frozen, the fine-tuning recipe, and the frozen-prefix feature cache."""

    freeze: str = option("none", "freeze the network up to this stage", choices=FREEZE_CHOICES)
    train_bn: bool = option(False, "keep BatchNorm in the frozen part training")
    recipe: str = option("auto", "finetune: train the head with the backbone frozen, then unfreeze with lower per-stage learning rates; plain: one rate for every layer, --freeze throughout; auto: finetune from weights, plain from scratch", choices=RECIPES)  # fmt: skip
    head_epochs: int = option(1, "finetune: epochs (out of --epochs) for the head alone", minimum=0)
    unfreeze: str = option("all", "finetune: unfreeze all at once, or one stage per epoch from the top", choices=UNFREEZE)  # fmt: skip
    stem_lr_ratio: float = option(0.5, "finetune: the stem's learning rate as a fraction of the head's", positive=True)  # fmt: skip
    cache: str = option("auto", "compute the frozen part once per image and train the rest from stored features (disk: a memory map in RUN/cache)", choices=CACHE_CHOICES)  # fmt: skip
    cache_views: int = option(4, "with random augmentation: augmented views stored per image", minimum=1)  # fmt: skip
    cache_dtype: str = option("auto", "storage type of cached features", choices=CACHE_DTYPES)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the numbers are computed."""

    device: str = option("auto", "auto (a GPU when present), cpu, cuda, cuda:N", resumable=True)
    precision: str = option("auto", "auto picks bf16 where the hardware has it, else fp32", choices=TRAIN_PRECISIONS)  # fmt: skip
    channels_last: bool = option(True, "channels-last memory layout (faster convolutions)")
    compile: bool = option(False, "torch.compile the model", resumable=True)
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs under torchrun")
    deterministic: bool = option(False, "deterministic algorithms (slower)")
    seed: int = option(0, "random seed")
    threads: int | None = option(None, "CPU threads (default: this process's share of the CPUs)", minimum=1, resumable=True)  # fmt: skip


# resfit.inference.unknown.SCORES (named here: this module imports no torch or numpy).


@dataclass(frozen=True)
class RunConfig:
    """The run folder, what is kept in it, and when to stop."""

    out: str = option("runs/run", "run folder to write")
    checkpoint_every: int | None = option(None, "also write checkpoints/last.pt every N steps, so a killed run resumes mid-epoch", minimum=1, resumable=True, metavar="N")  # fmt: skip
    early_stopping: int | None = option(None, "stop after this many epochs without a better validation score", minimum=1, resumable=True, metavar="PATIENCE")  # fmt: skip
    ema: bool = option(False, "keep an exponential moving average of the weights, validate it and save it as the run's model")  # fmt: skip
    ema_decay: float | None = option(None, "EMA decay per step (default: a half-life of 5%% of the steps)", minimum=0.0)  # fmt: skip
    precise_bn: int = option(2048, "re-estimate BN statistics on this many train images per epoch (0 = off)", minimum=0)  # fmt: skip
    report: bool = option(True, "write report.html", resumable=True)
    audit: bool = option(False, "after training, find the training labels that look wrong (resfit audit, frozen backbone): RUN/audit/, linked from the report; needs resfit[audit]", resumable=True)  # fmt: skip
    unknown_score: str = option("multistage", "the unknown-input score fitted after training (RUN/unknown.json; docs/guide/trust-unknown.md), or none", choices=UNKNOWN_SCORES, resumable=True)  # fmt: skip
    tensorboard: bool = option(False, "log to RUN/tensorboard", resumable=True)
    track: str | None = option(None, "log the run to an experiment tracker: parameters, each epoch's metrics, the model, report and exports (mlflow: MLFLOW_TRACKING_URI, default sqlite:///mlflow.db here; needs resfit[mlflow])", choices=TRACKERS, resumable=True)  # fmt: skip
    progress: bool = option(True, "progress bars", resumable=True)


@dataclass(frozen=True)
class CompressConfig:
    """Distillation from a teacher run, and quantization-aware training (smaller, int8 models)."""

    teacher: str | None = option(None, "distil from this run's model (resfit distill TEACHER_RUN DATA)", cli=False)  # fmt: skip
    temperature: float = option(1.0, "distillation: the temperature that softens teacher and student logits", positive=True)  # fmt: skip
    hard_weight: float = option(0.0, "distillation: weight of the labels' loss beside the teacher's (0: the teacher alone, as Beyer et al. 2022)", minimum=0.0)  # fmt: skip
    qat: int = option(0, "quantization-aware training (NNCF) for the last N epochs, so export --int8 keeps the accuracy; needs resfit[openvino]", minimum=0, metavar="N")  # fmt: skip


@dataclass(frozen=True)
class Preprocessing:
    """Filled by :func:`resfit.core.defaults.resolve_config` from the data and the weights."""

    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize_size: int | None = None  # eval resize before the centre crop (None: img_size / 0.875)
    interpolation: str = "bilinear"


SECTIONS = ("data", "model", "optim", "augment", "transfer", "runtime", "run", "compress")
_SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "transfer": TransferConfig,
    "runtime": RuntimeConfig,
    "run": RunConfig,
    "compress": CompressConfig,
}
# The augmentation knobs a flag sets, with their help; the rest come from --augment's preset.
AUGMENT_FLAGS: dict[str, str] = {
    "rotation": "max rotation in degrees",
    "translate": "max shift, fraction of the size",
    "hflip": "horizontal flip probability",
    "vflip": "vertical flip probability",
    "color_jitter": "colour jitter strength",
    "mixup": "MixUp alpha (0 = off)",
    "cutmix": "CutMix alpha (0 = off)",
}


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI and the checks see it."""

    name: str  # flat name: train(name=...), --name, config.json key
    section: str
    field: str
    type: Any
    default: Any
    help: str
    choices: tuple | None
    minimum: float | None
    resumable: bool
    cli: bool
    metavar: str | None
    positive: bool = False


def lr_value(text: str) -> float | str:
    """``--lr``: a number, or ``auto`` (the LR finder picks it before training)."""
    return "auto" if text == "auto" else float(text)


lr_value.__name__ = "a number or auto"  # argparse names the type in its error message

PARSERS = {"lr": lr_value, "window": window_value}


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return args[0] if len(args) == 1 else tp
    return tp


def _section_options(section: str, cls: type) -> Iterator[OptionInfo]:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        m = f.metadata
        yield OptionInfo(
            m.get("name") or f.name, section, f.name,
            PARSERS[m["parse"]] if m.get("parse") else _base_type(hints[f.name]), f.default,
            m.get("help", ""), m.get("choices"), m.get("minimum"), m.get("resumable", False),
            m.get("cli", True), m.get("metavar"), m.get("positive", False),
        )  # fmt: skip


def _augment_options() -> Iterator[OptionInfo]:
    yield OptionInfo("augment", "augment", "preset", str, "auto",
                     f"augmentation preset (auto: light, flips and crops, at {SMALL_IMAGE} px and "
                     f"below, none there from scratch in {SHORT_SCRATCH_EPOCHS} epochs or fewer; "
                     "standard above)", AUGMENT_CHOICES, None, False, True, None)  # fmt: skip
    for name, text in AUGMENT_FLAGS.items():
        yield OptionInfo(name, "augment", name, float, None, f"augmentation: {text}", None, 0.0,
                         False, True, None)  # fmt: skip


def _all_options() -> dict[str, OptionInfo]:
    out: dict[str, OptionInfo] = {}
    for section in SECTIONS:
        infos = (
            _augment_options()
            if section == "augment"
            else _section_options(section, _SECTION_TYPES[section])
        )
        for info in infos:
            assert info.name not in out, f"option {info.name} is defined twice"
            out[info.name] = info
    return out


OPTIONS: dict[str, OptionInfo] = _all_options()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Defaults work: only ``data`` and ``out`` are required.

    Build one from flat options with :meth:`from_options` (``TrainConfig.from_options(
    data="DATA", out="RUN", lr=0.1)``), read a section as ``cfg.optim.lr``.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    transfer: TransferConfig = TransferConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    run: RunConfig = RunConfig()
    compress: CompressConfig = CompressConfig()
    pre: Preprocessing = Preprocessing()

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """A config from flat options (unknown names raise ConfigError)."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> TrainConfig:
        """A new config with flat ``options`` changed; ``augment`` takes a preset name or an
        :class:`AugmentConfig`."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            info = OPTIONS.get(name)
            if info is None:
                raise ConfigError(f"unknown option {name!r}; the options are: {', '.join(OPTIONS)}")
            if name == "augment" and isinstance(value, AugmentConfig):
                changes.setdefault("augment", {}).update(dataclasses.asdict(value))
                continue
            changes.setdefault(info.section, {})[info.field] = value
        new = {s: dataclasses.replace(getattr(self, s), **c) for s, c in changes.items()}
        return dataclasses.replace(self, **new)

    # -- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """The value of the flat option ``name``."""
        info = OPTIONS[name]
        return getattr(getattr(self, info.section), info.field)

    @property
    def classes(self) -> list[str]:
        return list(self.pre.classes)

    @property
    def short_scratch(self) -> bool:
        """A run from scratch of at most :data:`SHORT_SCRATCH_EPOCHS` epochs (``--augment
        auto`` leaves small images unaugmented there)."""
        return self.model.weights is None and self.optim.epochs <= SHORT_SCRATCH_EPOCHS

    # -- checking ---------------------------------------------------------------------------

    def check(self) -> TrainConfig:
        """Reject bad options with a ConfigError that names the option; returns ``self``."""
        for name, info in OPTIONS.items():
            _check_option(name, info, self.get(name))
        d = self.data
        if not d.val_fraction < 1 or not d.test_fraction < 1:
            raise ConfigError("--val-fraction and --test-fraction must be in [0, 1)")
        if not self.transfer.stem_lr_ratio <= 1:
            raise ConfigError("--stem-lr-ratio must be in (0, 1]")
        parse_window(d.window)
        if self.run.ema_decay is not None and not self.run.ema_decay < 1:
            raise ConfigError("--ema-decay must be in [0, 1)")
        if not self.compress.hard_weight <= 1:
            raise ConfigError("--hard-weight must be in [0, 1]")
        try:
            self.augment.resolved()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    # -- the run folder's config.json -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON of ``config.json``: every option, the resolved augmentation and the
        preprocessing (``classes``, ``mean``, ``std``, ``resize_size``, ``interpolation``)."""
        d = {name: self.get(name) for name in OPTIONS if OPTIONS[name].section != "augment"}
        d["augment"] = self.augment.to_dict()
        p = self.pre
        d.update(classes=list(p.classes), mean=list(p.mean), std=list(p.std),
                 resize_size=p.resize_size, interpolation=p.interpolation)  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Read ``config.json`` (also those written before the sections existed)."""
        options = {k: v for k, v in d.items() if k in OPTIONS and k not in AUGMENT_FLAGS}
        if options.get("recipe") == "default":  # the plain recipe's name before --recipe auto
            options["recipe"] = "plain"
        if isinstance(aug := d.get("augment") or {}, dict):
            options["augment"] = _augment_from_dict(aug)
        cfg = cls.from_options(**options)
        pre = Preprocessing(
            tuple(d.get("classes") or ()), tuple(d.get("mean") or ()), tuple(d.get("std") or ()),
            d.get("resize_size"), d.get("interpolation") or "bilinear",
        )  # fmt: skip
        return dataclasses.replace(cfg, pre=pre)


def _check_option(name: str, info: OptionInfo, value: Any) -> None:
    """Raise a ConfigError naming ``name`` when ``value`` breaks its option's rules."""
    if value is None:
        return
    if name == "lr" and isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"--lr must be a number or auto, not {value!r}")
        return
    if info.choices is not None and value not in info.choices:
        raise ConfigError(
            f"{flag(name)} must be one of {', '.join(map(str, info.choices))}, not {value!r}"
        )
    if info.positive and not value > 0:
        raise ConfigError(f"{flag(name)} must be positive")
    if info.minimum is not None and value < info.minimum:
        raise ConfigError(_minimum_message(name, info.minimum))


def _augment_from_dict(aug: Mapping[str, Any]) -> AugmentConfig:
    """The ``augment`` of ``config.json`` (lists back to tuples, unknown knobs dropped)."""
    known = {f.name for f in fields(AugmentConfig)}
    return AugmentConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items() if k in known}
    )


def _minimum_message(name: str, minimum: float) -> str:
    if minimum == 0:
        return f"{flag(name)} must not be negative"
    if name == "img_size":
        return f"{flag(name)} must be at least {minimum:g} pixels"
    return f"{flag(name)} must be at least {minimum:g}"
