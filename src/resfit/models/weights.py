"""Pretrained weights: a registry, verified downloads, safe loading, and ``create_model``.

The ImageNet entries are read from torchvision's own weights metadata (address, hash prefix,
preprocessing, categories, accuracy), never copied by hand. The CIFAR-10 entries are the
checkpoints of He et al.'s CIFAR ResNets trained by Yerlan Idelbayev (pytorch_resnet_cifar10).

Files are never unpickled: ``torch.load(..., weights_only=True)`` or safetensors.

Environment:
- ``RESFIT_CACHE_DIR``: cache root (default ``$XDG_CACHE_HOME/resfit`` or ``~/.cache/resfit``);
  weights live in its ``weights/`` folder.
- ``RESFIT_WEIGHTS_MIRROR``: a base URL (``http://host/path/``) or a local folder that holds the
  weight files under their file names; used instead of the original addresses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.atomic import atomic_commit
from ..core.cache import cache_dir
from ..core.errors import WeightsError
from ..core.hashing import file_sha256
from ..core.registry import Registry
from .adapters import adapt
from .resnet import get_spec

log = logging.getLogger("resfit")

__all__ = [
    "WeightsSpec",
    "WeightsError",
    "create_model",
    "download_weights",
    "get_weights",
    "list_weights",
    "load_state_dict_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightsSpec:
    """One set of pretrained weights and everything needed to use them."""

    name: str
    arch: str
    url: str
    sha256: str  # full digest, or the prefix that torchvision puts in its file names
    num_classes: int
    categories: tuple[str, ...]
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def filename(self) -> str:
        return urllib.parse.urlparse(self.url).path.rsplit("/", 1)[-1]

    def preprocessing(self) -> dict[str, object]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


WEIGHTS: Registry[str, WeightsSpec] = Registry("weights", listing="`resfit weights` lists them")
_DEFAULT_FOR_ARCH: dict[str, str] = {}


def _register_torchvision() -> None:
    from torchvision.models import get_model_weights

    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        enum = get_model_weights(arch)
        for w in enum:
            t = w.transforms()
            meta = w.meta
            # torchvision file names end in the first 8+ hex digits of the file's sha256.
            hash_prefix = Path(w.url).stem.rsplit("-", 1)[-1]
            spec = WeightsSpec(
                name=f"{arch}.{w.name.lower()}",
                arch=arch,
                url=w.url,
                sha256=hash_prefix,
                num_classes=len(meta["categories"]),
                categories=tuple(meta["categories"]),
                input_size=t.crop_size[0],
                resize_size=t.resize_size[0],
                mean=tuple(t.mean),
                std=tuple(t.std),
                interpolation=t.interpolation.value,
                metrics={
                    k.replace("acc@", "top"): v for k, v in meta["_metrics"]["ImageNet-1K"].items()
                },
                source=f"torchvision {enum.__name__}.{w.name}",
            )
            WEIGHTS.register(spec.name, spec)
        _DEFAULT_FOR_ARCH[arch] = f"{arch}.{enum.DEFAULT.name.lower()}"


_CIFAR_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# depth -> (sha256 of the file, published test error in % on the lossless CIFAR-10 test set)
_CIFAR_CHECKPOINTS = {
    20: ("12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 8.27),
    32: ("d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", 7.37),
    44: ("014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4", 6.90),
    56: ("4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 6.61),
}


def _register_cifar() -> None:
    for depth, (sha, err) in _CIFAR_CHECKPOINTS.items():
        arch = f"resnet{depth}_cifar"
        spec = WeightsSpec(
            name=f"{arch}.cifar10",
            arch=arch,
            url=f"{_CIFAR_BASE}resnet{depth}-{sha[:8]}.th",
            sha256=sha,
            num_classes=10,
            categories=CIFAR10_CLASSES,
            input_size=32,
            resize_size=32,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            metrics={"top1": round(100 - err, 2)},
            source="Yerlan Idelbayev, pytorch_resnet_cifar10 (BSD-2-Clause)",
        )
        WEIGHTS.register(spec.name, spec)
        _DEFAULT_FOR_ARCH[arch] = spec.name


_register_torchvision()
_register_cifar()


def list_weights(arch: str | None = None) -> list[str]:
    """Registered weight names, optionally only those for one architecture."""
    return sorted(n for n, s in WEIGHTS.items() if arch is None or s.arch == arch)


def get_weights(name: str, arch: str | None = None) -> WeightsSpec:
    """Look up registered weights by name; ``"pretrained"`` means the default for ``arch``."""
    if name in ("pretrained", "default", "DEFAULT"):
        if arch is None or arch not in _DEFAULT_FOR_ARCH:
            raise WeightsError(
                f"no pretrained weights are registered for {arch!r}; `resfit weights` lists them"
            )
        name = _DEFAULT_FOR_ARCH[arch]
    # Accept torchvision's spelling too: ResNet50_Weights.IMAGENET1K_V2
    if name not in WEIGHTS and "_Weights." in name:
        head, tag = name.split("_Weights.", 1)
        name = f"{head.lower()}.{tag.lower()}"
    if name not in WEIGHTS:
        raise WeightsError(
            f"unknown weights {name!r}: give a registered name (`resfit weights` lists them, "
            f"e.g. {', '.join(WEIGHTS.names()[:2])}) or the path of a "
            f"{'/'.join(WEIGHT_SUFFIXES)} file"
        )
    return WEIGHTS.get(name)


# ---------------------------------------------------------------------------------------------
# Download


def weights_dir() -> Path:
    return cache_dir() / "weights"


def _source_url(spec: WeightsSpec) -> str:
    mirror = os.environ.get("RESFIT_WEIGHTS_MIRROR")
    if not mirror:
        return spec.url
    if "://" not in mirror:  # a local folder
        return Path(mirror).expanduser().resolve().joinpath(spec.filename).as_uri()
    return mirror.rstrip("/") + "/" + spec.filename


def download_weights(spec: WeightsSpec, progress: bool = True) -> Path:
    """Return the verified local file for ``spec``, downloading it into the cache if needed.

    The download goes to a temporary file beside the target and is renamed into place only
    after its sha256 matched, so a failed or tampered download leaves nothing behind.
    """
    folder = weights_dir()
    target = folder / spec.filename
    if target.exists():
        if file_sha256(target).startswith(spec.sha256):
            return target
        raise WeightsError(
            f"{target} does not match the sha256 expected for {spec.name} ({spec.sha256}...): "
            f"delete it and try again"
        )
    url = _source_url(spec)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from ..core.progress import progress_bar

            with progress_bar(
                total=total, unit="B", unit_scale=True, desc=spec.filename, enabled=progress
            ) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if not digest.hexdigest().startswith(spec.sha256):
            raise WeightsError(
                f"downloaded {spec.filename} from {url} but its sha256 {digest.hexdigest()[:16]}... "
                f"does not match the expected {spec.sha256[:16]}...: the file is corrupt or not "
                f"the published one; nothing was kept in {folder}"
            )
        atomic_commit(tmp, target)
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(
            f"could not download {spec.filename} for {spec.name} from {url} ({reason}). "
            f"Offline? Put the file {spec.filename} (from {spec.url}) in {folder}, "
            f"or set RESFIT_WEIGHTS_MIRROR to a server or folder that has it."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Loading state dicts


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file without unpickling arbitrary objects.

    Understands the common wrappers: ``{'state_dict': ...}`` (the CIFAR checkpoints),
    ``{'model': ...}``, resfit's own checkpoints, and the ``module.`` prefix of DataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: object = load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is not a valid safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise WeightsError(
                f"refused to load {path}: it holds Python objects other than tensors, and "
                f"resfit never unpickles those (they can run code). Re-save it as a plain "
                f"state dict or as .safetensors. ({str(e).splitlines()[0]})"
            ) from None
        except Exception as e:
            raise WeightsError(f"{path} is not a readable PyTorch weights file ({e})") from None
    for key in ("state_dict", "model", "model_state_dict", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module."
    if all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _adapt_state_dict(sd: dict[str, Tensor], head: str) -> dict[str, Tensor]:
    """Map other layouts onto ours: CIFAR checkpoints call the classifier ``linear`` (ours is
    ``head``)."""
    if f"{head}.weight" in sd:
        return sd
    old = "linear."
    return {(f"{head}.{k[len(old) :]}" if k.startswith(old) else k): v for k, v in sd.items()}


def _fill_bn_counters(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Checkpoints saved before PyTorch 0.4.1 (the CIFAR ones) store no ``num_batches_tracked``."""
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    return sd


def _check_fits(sd: dict[str, Tensor], model: nn.Module, arch: str, source: str, head: str) -> None:
    own = model.state_dict()
    body = lambda keys: {k for k in keys if not k.startswith(f"{head}.")}  # noqa: E731
    missing = sorted(body(own) - body(sd))
    unexpected = sorted(body(sd) - body(own))
    wrong = sorted(k for k in body(own) & body(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise WeightsError(
            f"{source} does not fit architecture {arch!r}: {'; '.join(parts)}. "
            f"Pick the --arch it was trained with."
        )


def _adapt_in_chans(weight: Tensor, in_chans: int, source: str = "the weights") -> Tensor:
    """The first conv's ``weight`` for ``in_chans`` input channels, where that is well defined:
    to one channel (a grey image is R = G = B, so summing the filters gives the same response),
    from one channel (each channel gets the grey filter / ``in_chans``, so an image whose
    channels are equal sees the grey response), and from RGB to more channels (timm's
    convention: the filters repeated, scaled by 3 / ``in_chans``)."""
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if have not in (1, 3):
        raise WeightsError(
            f"{source} was trained on {have}-channel images and its first convolution cannot "
            f"be adapted to {in_chans} channels: use --in-chans {have} (in_chans={have})"
        )
    repeats = -(-in_chans // have)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (have / in_chans)


def _set_in_chans(model: nn.Module, in_chans: int, source: str) -> None:
    """Give ``model`` a first convolution for ``in_chans`` channels, adapted from its own."""
    a = adapt(model)
    conv, have = a.first_conv, a.in_chans
    w = _adapt_in_chans(conv.weight.detach(), in_chans, source)
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=conv.bias is not None,
    )  # fmt: skip
    new.weight.data.copy_(w)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach())
    a.set_first_conv(new.to(conv.weight.device, conv.weight.dtype))
    if in_chans == 1:
        how = f"its {have} channels' filters summed"
    elif have == 1:
        how = f"the one-channel filter copied to each channel and divided by {in_chans}"
    else:
        how = f"the filters repeated and scaled by {have}/{in_chans}"
    log.info(
        "%s was trained on %d-channel images; its first convolution is adapted to %d (%s)",
        source,
        have,
        in_chans,
        how,
    )


def _read_weights(
    name: str, weights: str | os.PathLike, progress: bool
) -> tuple[dict[str, Tensor], str, WeightsSpec | None]:
    """The state dict of a weights file or registered name, where it came from, and its spec."""
    wpath = Path(weights)
    if str(weights).endswith(WEIGHT_SUFFIXES) or wpath.exists():
        return load_state_dict_file(wpath), str(wpath), None
    wspec = get_weights(str(weights), arch=name)
    if wspec.arch != name:
        raise WeightsError(
            f"weights {wspec.name} are for {wspec.arch}, not {name}: "
            f"use --arch {wspec.arch} or other weights ({', '.join(list_weights(name)) or 'none registered'})"
        )
    return load_state_dict_file(download_weights(wspec, progress=progress)), wspec.name, wspec


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    in_chans: int = 3,
    progress: bool = True,
    **kwargs,
) -> nn.Module:
    """Build architecture ``name``, optionally with pretrained ``weights``.

    ``weights`` is a registered name (``resfit weights`` lists them; ``"pretrained"`` picks the
    architecture's default) or a local .pth/.pt/.th/.safetensors file. With a ``num_classes``
    other than the checkpoint's, the classifier is replaced and re-initialised. With an
    ``in_chans`` other than the checkpoint's, the first convolution is adapted: RGB filters are
    summed for one channel, a one-channel filter is spread over three (see ``_adapt_in_chans``).

    The model gets a ``pretrained_cfg`` dict: preprocessing, categories and the weights' source.
    """
    spec_model = get_spec(name)
    if weights is None:
        model = spec_model.build(
            num_classes=num_classes or spec_model.default_num_classes, in_chans=in_chans, **kwargs
        )
        model.pretrained_cfg = {}
        return model

    sd, source, wspec = _read_weights(name, weights, progress)
    # Where the head and the first conv sit in the state dict, from a model on the meta device
    # (no memory, no random draws): the real one is then built once, shaped as the checkpoint.
    with torch.device("meta"):
        probe = adapt(spec_model.build(**kwargs))
    head, conv = probe.name_of(probe.head), f"{probe.name_of(probe.first_conv)}.weight"
    sd = _adapt_state_dict(sd, head)
    if f"{head}.weight" not in sd:
        raise WeightsError(f"{source} has no classifier weights ({head} or linear)")
    have = sd[conv].shape[1] if conv in sd and sd[conv].ndim == 4 else in_chans
    model = spec_model.build(num_classes=sd[f"{head}.weight"].shape[0], in_chans=have, **kwargs)
    sd = _fill_bn_counters(sd, model)
    _check_fits(sd, model, name, source, head)
    model.load_state_dict(sd, strict=True)
    if in_chans != have:
        _set_in_chans(model, in_chans, source)

    categories: list[str] | None = list(wspec.categories) if wspec else None
    if _replace_head(model, num_classes, source):
        categories = None
    model.pretrained_cfg = {
        "weights": source,
        "categories": categories,
        **(wspec.preprocessing() if wspec else {}),
    }
    return model


def _replace_head(model: nn.Module, num_classes: int | None, source: str) -> bool:
    """A new, randomly initialised head when ``num_classes`` differs from the checkpoint's;
    whether it was replaced."""
    a = adapt(model)
    if num_classes is None or num_classes == a.num_classes:
        return False
    log.warning(
        "replacing the %d-class head of %s with a new, randomly initialised %d-class head",
        a.num_classes,
        source,
        num_classes,
    )
    a.reset_head(num_classes)
    return True
