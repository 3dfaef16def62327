"""The synthesis-method registry (timm-style): ``@register_method("name", config=ConfigClass)``.

A method is one entry: a config class (a subclass of :class:`SynthesisConfig`, whose field
defaults ARE the method's defaults), and either

* a ``loss`` function (the decorated function): the pixels are optimised by the recover engine
  (:mod:`gvbsm_hf.recover.engine`) and the function returns the loss of one step and its named
  components, given a :class:`SynthesisStep`; an optional ``init`` gives each job's start images;
* or a ``select`` function (``select=True``): the set is chosen, not optimised (e.g. a random
  real subset), given the real train split.

Adding a method is one registered entry; nothing else in the package names methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from ..errors import GVBSMError

if TYPE_CHECKING:
    import torch

    from ..recover.config import SynthesisArguments


@dataclass
class SynthesisConfig:
    """Fields every synthesis method has. The *protocol* fields (:attr:`PROTOCOL_FIELDS`) come
    from the recipe for the main method AND every baseline (same IPC, iterations, optimiser,
    augmentation, seed); every other field is the method's own, with the subclass's default."""

    syn_method: str = ""
    ipc: int = 10
    syn_iterations: int = 1000
    syn_lr: float = 0.05
    syn_adam_betas: list = field(default_factory=lambda: [0.5, 0.9])
    syn_classes_per_batch: Optional[int] = None
    syn_slots_per_batch: Optional[int] = None
    syn_teachers: Optional[list] = None
    syn_protocol: str = "authors"
    syn_augment: str = "authors"
    syn_crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    syn_first_layer: str = "first_conv"
    syn_beta_dr_unit: str = "layer"
    syn_ema_init: str = "zero"
    syn_dd_pool: str = "always"
    syn_mixed_precision: str = "no"
    syn_channels_last: bool = False
    syn_checkpoint_every: int = 100
    syn_seed: int = 0
    # method fields common to optimised methods
    syn_init: str = "noise"
    syn_backbone_choice: str = "uniform"
    syn_single_teacher: bool = False
    # real-crop selection (the ``rded`` method, and ``syn_init="rded"``; :mod:`gvbsm_hf.methods.rded`)
    syn_rded_candidates: Optional[int] = None
    syn_rded_crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    syn_rded_factor: int = 2
    syn_rded_selection: str = "lowest_ce"

    PROTOCOL_FIELDS: ClassVar[tuple[str, ...]] = (
        "ipc", "syn_iterations", "syn_lr", "syn_adam_betas", "syn_classes_per_batch", "syn_slots_per_batch",
        "syn_teachers", "syn_protocol", "syn_augment", "syn_crop_scale", "syn_first_layer", "syn_beta_dr_unit",
        "syn_ema_init", "syn_dd_pool", "syn_mixed_precision", "syn_channels_last", "syn_checkpoint_every", "syn_seed",
    )
    """Fields shared by the main method and every baseline (the harness and its fidelity options)."""

    def uses_bn(self) -> bool:
        """Whether the teachers' BN inputs are hooked (BN matching)."""
        return False

    def uses_conv(self) -> bool:
        """Whether Conv statistics are hooked and recorded statistics are needed."""
        return False

    def uses_class_stats(self) -> bool:
        """Whether per-class (category-aware) statistics are matched: recorded with ``stats_per_class``."""
        return False

    def real_batch_size(self) -> int:
        """Real train images the engine draws per iteration for the loss (``SynthesisStep.real_x``);
        0: none (the default; only methods that regress on real data, e.g. ``feature_regression``)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SynthesisStep:
    """What a method's loss sees at one iteration of one job.

    ``x`` is the augmented batch the teacher saw (normalised, differentiable w.r.t. the pixels),
    ``logits`` the teacher's output, ``teacher`` the prepared teacher (hooks with this forward's
    statistics, BN/Conv targets, first-layer weights), ``state`` a per-teacher dict the method
    owns (EMAs; nested dicts/tuples of tensors, checkpointed and restored on resume),
    ``generator`` the job's CPU generator (random drops). ``job_state`` is a dict the method owns
    for the whole job (shared by the teachers; checkpointed like ``state``). ``real_x`` /
    ``real_labels``: a class-balanced batch of ``config.real_batch_size()`` real train images of
    the job's classes (normalised, on the device), drawn afresh every iteration; ``None`` when the
    method asks for none. ``teachers``: every synthesis teacher's model in slot order (hooks of all
    but ``teachers[teacher_index]``, this iteration's ``teacher.model``, are off)."""

    config: SynthesisConfig
    x: "torch.Tensor"
    logits: "torch.Tensor"
    labels: "torch.Tensor"
    teacher: Any
    state: dict
    generator: "torch.Generator"
    iteration: int
    job_state: dict = field(default_factory=dict)
    real_x: Optional["torch.Tensor"] = None
    real_labels: Optional["torch.Tensor"] = None
    teachers: tuple = ()
    teacher_index: int = 0


LossFn = Callable[[SynthesisStep], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class SynthesisMethod:
    """A registered method: its name, config class and loss (optimised) or select (chosen) function."""

    name: str
    config_class: type[SynthesisConfig]
    loss: Optional[LossFn] = None
    select: Optional[Callable[..., Any]] = None
    init: Optional[Callable[..., Any]] = None
    description: str = ""
    real_per_class: Optional[Callable[[SynthesisConfig], Optional[int]]] = None
    """For a select method: how many real train images per class it reads (``None``: the whole split)."""

    @property
    def optimised(self) -> bool:
        return self.loss is not None

    def needs_real(self, config: SynthesisConfig) -> bool:
        """Whether the real train split is needed (selection, or real-image initialisation)."""
        return self.select is not None or config.syn_init in ("real", "rded") or config.real_batch_size() > 0


_METHODS: dict[str, SynthesisMethod] = {}


def register_method(
    name: str,
    *,
    config: type[SynthesisConfig],
    select: bool = False,
    init: Callable[..., Any] | None = None,
    description: str = "",
    overwrite: bool = False,
    real_per_class: Callable[[SynthesisConfig], Optional[int]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering a synthesis method under ``name`` (see the module docstring).

    A select function is called as ``fn(real, spec, config)``, plus ``teachers=`` (the synthesis
    teachers) and ``device=`` when it accepts them. ``real_per_class(config)`` says how many real
    images per class it reads (``None``: all), so a caller can decode only those."""
    if not (isinstance(config, type) and issubclass(config, SynthesisConfig)):
        raise GVBSMError(f"register_method({name!r}): config must be a subclass of SynthesisConfig.")

    def decorator(fn: Callable) -> Callable:
        if name in _METHODS and not overwrite:
            raise GVBSMError(f"A synthesis method named {name!r} is already registered; pick another name.")
        _METHODS[name] = SynthesisMethod(
            name=name, config_class=config, loss=None if select else fn, select=fn if select else None,
            init=init, description=description or (fn.__doc__ or "").strip().split("\n")[0],
            real_per_class=real_per_class,
        )
        return fn

    return decorator


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> SynthesisMethod:
    if name not in _METHODS:
        from difflib import get_close_matches

        close = get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GVBSMError(f"Unknown synthesis method {name!r}{hint}; registered: {list(_METHODS)}.")
    return _METHODS[name]


def method_config(name: str, args: "SynthesisArguments | None" = None, *, baseline: bool = False,
                  **overrides: Any) -> SynthesisConfig:
    """The config of method ``name`` for a run.

    Protocol fields always come from ``args`` (the recipe). Method fields come from ``args`` only
    for the main method (``baseline=False``) and only where the recipe set them (not ``None``);
    a baseline uses its own defaults throughout, so a recipe's ``syn_alpha`` never leaks into
    ``sre2l``. A method field set in the recipe that ``name``'s config does not have is an error.
    """
    method = get_method(name)
    cls = method.config_class
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if args is not None:
        for f in dataclasses.fields(args):
            value = getattr(args, f.name)
            if f.name == "syn_method":
                continue
            if f.name in SynthesisConfig.PROTOCOL_FIELDS:
                kwargs[f.name] = list(value) if isinstance(value, (list, tuple)) else value
            elif not baseline and value is not None:
                if f.name not in own:
                    raise GVBSMError(f"{f.name} is not an option of synthesis method {name!r} (its options: "
                                     f"{sorted(own - set(SynthesisConfig.PROTOCOL_FIELDS) - {'syn_method'})}); "
                                     f"remove it from the recipe.")
                kwargs[f.name] = value
    unknown = set(overrides) - own
    if unknown:
        raise GVBSMError(f"{sorted(unknown)} are not fields of {cls.__name__} (method {name!r}).")
    kwargs.update(overrides)
    return cls(syn_method=name, **kwargs)
