"""Backbone registry (timm style): the small-image zoo, torchvision (``tv:``), timm (``timm:`` or a
bare timm name) and timm Hub models (``hf-hub:``).

Every backbone maps normalised images ``(N, in_chans, S, S)`` to logits ``(N, num_classes)``.
The teachers of the squeeze stage and the students of the evaluate stage (docs/method.md "Stages")
are created here.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models import get_pretrained_cfg
from torch import nn

from .. import hub_utils
from ..errors import GVBSMError, UnknownBackboneError

logger = logging.getLogger(__name__)

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, tuple[BackboneFactory, dict[str, Any]]] = {}

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
HF_HUB_PREFIX = "hf-hub:"
_OFFLINE_FIX = (
    "set `teacher_pretrained: false` in the recipe (--teacher_pretrained false; pretrained=False in Python) "
    "to train from scratch; or, on a machine with network access, download the weights once into the local "
    "cache (HF_HOME / TORCH_HOME) and copy the cache here; or list a trained teacher folder in `teachers:` "
    "(--teachers <folder>) instead of the backbone name."
)


def register_backbone(name: str, **default_kwargs: Any) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``fn(num_classes, in_chans, image_size, **kw) -> nn.Module`` as ``name``.

    ``default_kwargs`` are passed to the factory unless :func:`create_backbone` overrides them, so one
    factory can be registered under several names (``convnet`` / ``convnet128``).
    """
    if not name or ":" in name:
        raise GVBSMError(f"Backbone name {name!r} must be non-empty and must not contain ':' (prefixes are reserved).")

    def decorator(fn: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY and _REGISTRY[name][0] is not fn:
            raise GVBSMError(f"Backbone {name!r} is already registered; pick another name.")
        _REGISTRY[name] = (fn, dict(default_kwargs))
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Names of the registered (zoo) backbones, sorted."""
    return sorted(_REGISTRY)


def has_pretrained_weights(name: str) -> bool:
    """True if ``name`` can start from pretrained weights: torchvision (``tv:``), timm (``timm:`` or a
    bare timm name) and timm Hub (``hf-hub:``) backbones. Zoo backbones have none (trained from
    scratch). Resolves the name only (no network); timm may still lack weights for a given model."""
    if name in _REGISTRY:
        return False
    return name.startswith((TV_PREFIX, TIMM_PREFIX, HF_HUB_PREFIX)) or is_backbone_name(name)


def is_backbone_name(name: str) -> bool:
    """True if :func:`create_backbone` can resolve ``name`` without touching the network."""
    if name in _REGISTRY or name.startswith(HF_HUB_PREFIX):
        return True
    if name.startswith(TV_PREFIX):
        return name[len(TV_PREFIX):] in torchvision.models.list_models()
    return timm.is_model(name.removeprefix(TIMM_PREFIX))


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone mapping ``(N, in_chans, S, S)`` normalised images to ``(N, num_classes)`` logits.

    Resolution order: zoo name; ``tv:<name>`` (torchvision ``get_model``, first conv and classifier
    adapted); ``timm:<name>`` or a bare name timm knows; ``hf-hub:<repo>`` (timm from the Hub).
    Raises :class:`UnknownBackboneError` with close matches, and :class:`OfflineError` (within
    seconds) when pretrained weights are needed, not cached and the network is unreachable.
    """
    if name in _REGISTRY:
        if pretrained:
            raise GVBSMError(
                f"Zoo backbone {name!r} has no pretrained weights (pretrained=False only). In a recipe, "
                "`teacher_pretrained: true` starts only 'timm:' / 'tv:' / 'hf-hub:' teachers from pretrained "
                f"weights and trains zoo teachers such as {name!r} from scratch, which needs "
                "`teacher_epochs: N` >= 1 (--teacher_epochs N); or list a trained teacher folder in `teachers:`."
            )
        fn, defaults = _REGISTRY[name]
        return fn(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **{**defaults, **kwargs})
    if name.startswith(TV_PREFIX):
        return _create_torchvision(name[len(TV_PREFIX):], num_classes, in_chans, pretrained, **kwargs)
    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):]
        if not hub_utils.hub_file_cached(repo, ("config.json",)):
            _require_network(f"timm Hub model {name!r}")
        return _create_timm(name, num_classes, in_chans, pretrained, **kwargs)
    timm_name = name.removeprefix(TIMM_PREFIX)
    if timm.is_model(timm_name):
        return _create_timm(timm_name, num_classes, in_chans, pretrained, **kwargs)
    raise UnknownBackboneError(unknown_backbone_message(name))


# --------------------------------------------------------------------------------------------- timm


def _create_timm(name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained and not name.startswith(HF_HUB_PREFIX) and not _timm_weights_cached(name):
        _require_network(f"pretrained timm weights for {name!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (OSError, RuntimeError) as e:  # huggingface_hub offline / connection errors
        if pretrained or name.startswith(HF_HUB_PREFIX):
            raise hub_utils.offline_error(f"Could not fetch weights for {name!r}", str(e), _OFFLINE_FIX) from e
        raise


def _timm_weights_cached(name: str) -> bool:
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tag: let timm raise its own error later
        return False
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        if hub_utils.hub_file_cached(cfg.hf_hub_id, files):
            return True
    return bool(cfg.url) and _torch_hub_cached(cfg.url)


# -------------------------------------------------------------------------------------- torchvision


def _create_torchvision(name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if name not in torchvision.models.list_models():
        raise UnknownBackboneError(unknown_backbone_message(TV_PREFIX + name))
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        if not _torch_hub_cached(weights.url):
            _require_network(f"pretrained torchvision weights for 'tv:{name}'", url=weights.url)
        model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        _replace_classifier(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_chans != 3:
        _adapt_first_conv(model, in_chans, pretrained)
    return model


def _adapt_first_conv(model: nn.Module, in_chans: int, pretrained: bool) -> None:
    """Replace the first ``Conv2d`` by one with ``in_chans`` inputs.

    Pretrained filters are averaged over the input channels and scaled by ``3 / in_chans``, so that a
    grey image repeated on 3 channels gives the same activations as before (sum for 1 channel).
    """
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise GVBSMError(f"{type(model).__name__} has no Conv2d to adapt to in_chans={in_chans}; use in_chans=3.")
    if module.groups != 1:
        raise GVBSMError(f"The first conv of {type(model).__name__} is grouped; use in_chans=3 for this model.")
    new = nn.Conv2d(
        in_chans, module.out_channels, module.kernel_size, module.stride, module.padding, module.dilation,
        1, module.bias is not None, module.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            w = module.weight.mean(dim=1, keepdim=True) * (module.in_channels / in_chans)
            new.weight.copy_(w.expand(-1, in_chans, -1, -1))
            if module.bias is not None:
                new.bias.copy_(module.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Replace the last ``Linear`` (or 1x1 ``Conv2d`` head, e.g. SqueezeNet) by a fresh one, unless it
    already has ``num_classes`` outputs (ImageNet-1k: the pretrained head is kept)."""
    last_path, last = None, None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_path, last = path, module
    if last is None:
        for path, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                last_path, last = path, module
    if last is None or last_path is None:
        raise GVBSMError(f"Cannot find the classifier of {type(model).__name__}; use pretrained=False.")
    if (last.out_features if isinstance(last, nn.Linear) else last.out_channels) == num_classes:
        return
    if isinstance(last, nn.Linear):
        new: nn.Module = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    else:
        new = nn.Conv2d(last.in_channels, num_classes, 1)
    parent_path, _, attr = last_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


# ------------------------------------------------------------------------------- network and caches


def _torch_hub_cached(url: str) -> bool:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    return os.path.exists(path)


def _require_network(what: str, *, url: str | None = None) -> None:
    """Raise :class:`~gvbsm_hf.errors.OfflineError` within seconds if ``url`` (default: the Hub)
    cannot be reached or offline mode is on (:func:`gvbsm_hf.hub_utils.require_online`)."""
    hub_utils.require_online(f"{what} are not in the local cache", _OFFLINE_FIX, url=url)


# ----------------------------------------------------------------------------------- error messages


def unknown_backbone_message(name: str) -> str:
    zoo = list_backbones()
    tv = [TV_PREFIX + n for n in torchvision.models.list_models()]

    def close(query: str, candidates: list[str], n: int) -> list[str]:
        return difflib.get_close_matches(query, candidates, n=n, cutoff=0.5)

    # the zoo names first (what a recipe usually means), then torchvision, then timm: one list
    # ranked by similarity alone would put timm's many near-names before the zoo name one typo away
    if name.startswith(TV_PREFIX):
        matches = close(name, tv, 5)
    elif name.startswith(TIMM_PREFIX):
        matches = [TIMM_PREFIX + m for m in close(name[len(TIMM_PREFIX):], timm.list_models(), 5)]
    else:
        matches = close(name, zoo, 3)
        zoo_names = set(zoo)  # a zoo name shadows the timm model of the same name
        matches += close(name, tv, 2) + close(name, [m for m in timm.list_models() if m not in zoo_names], 2)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    return (
        f"Unknown backbone {name!r}.{hint} Zoo backbones (gvbsm_hf.backbones.list_backbones()): {', '.join(zoo)}. "
        "timm models: timm.list_models('*pattern*'), used as 'timm:<name>' or the bare name; torchvision models: "
        "torchvision.models.list_models(), used as 'tv:<name>'; timm models on the Hub: 'hf-hub:<org>/<repo>'."
    )
