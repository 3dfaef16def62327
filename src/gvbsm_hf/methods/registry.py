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
from difflib import get_close_matches
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Optional

from ..errors import GVBSMError
from ..validation import RecipeError, check_choice, check_crop_scale, check_range
from .protocol import PROTOCOL_FIELDS, SynthesisProtocol

if TYPE_CHECKING:
    import torch


METHOD_OPTION_HELP = " (docs/method.md \"Baselines and ablations\")"

BackboneChoice = Literal["uniform", "round_robin"]
RDEDSelection = Literal["lowest_ce", "cluster_lowest_ce", "cluster_centroid", "boundary", "kcenter", "facility_location"]


@dataclass
class SynthesisConfig(SynthesisProtocol):
    """A method's config: the protocol (:class:`~gvbsm_hf.methods.protocol.SynthesisProtocol`, from
    the recipe for the main method AND every baseline) plus the method's own options, declared once
    in the method's config class with their defaults, help and checks (``validate``). The fields
    below are the options every method has; a subclass adds its own."""

    syn_method: str = ""
    syn_init: str = field(default="noise", metadata={"help": "Start images: a registered initialisation ('noise', "
                          "'real' random real images, 'rded' the crops the rded method selects; list_inits())."})
    syn_backbone_choice: BackboneChoice = field(
        default="uniform", metadata={"help": "'uniform' sampling (paper, Eq. 7) or 'round_robin' (authors' code)."})
    syn_single_teacher: bool = field(default=False, metadata={"help": "Use only the first teacher (SRe2L)."})
    # real-crop selection (the ``rded`` method, and ``syn_init="rded"``; :mod:`gvbsm_hf.methods.rded`)
    syn_rded_candidates: Optional[int] = field(
        default=None, metadata={"help": "rded / syn_init rded: random crops scored per class (lowest ensemble CE "
                                "wins); unset: 5 x ipc x syn_rded_factor^2."})
    syn_rded_crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "rded: area fraction [min, max] of the square candidate crops."})
    syn_rded_factor: int = field(
        default=2, metadata={"help": "rded: stitch factor x factor selected crops into one image (1: no stitching)."})
    syn_rded_selection: RDEDSelection = field(
        default="lowest_ce", metadata={"help": "rded: which candidates are kept: 'lowest_ce' (RDED), or k-means of the "
                                       "candidates' teacher logits into k clusters and per cluster the lowest-CE member "
                                       "('cluster_lowest_ce') or the member nearest its centre ('cluster_centroid'), or "
                                       "'boundary': the highest-CE candidates the ensemble still classifies correctly, or "
                                       "'kcenter': greedy farthest-point coverage of the teachers' penultimate features, "
                                       "or 'facility_location': greedy k-medoids-style average coverage of the same features."})

    PROTOCOL_FIELDS: ClassVar[tuple[str, ...]] = PROTOCOL_FIELDS
    """Fields shared by the main method and every baseline (the harness and its fidelity options)."""

    def validate(self) -> None:
        super().validate()
        check_choice("syn_init", self.syn_init, list_inits())
        check_range("syn_rded_candidates", self.syn_rded_candidates, 1, allow_none=True)
        check_crop_scale("syn_rded_crop_scale", self.syn_rded_crop_scale)
        check_range("syn_rded_factor", self.syn_rded_factor, 1)

    @classmethod
    def options(cls) -> list[str]:
        """The method's own option names (every field but the protocol and ``syn_method``)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in PROTOCOL_FIELDS and f.name != "syn_method"]

    def uses_bn(self) -> bool:
        """Whether the teachers' BN inputs are hooked (BN matching)."""
        return False

    def uses_conv(self) -> bool:
        """Whether Conv statistics are hooked and recorded statistics are needed."""
        return False

    def uses_class_stats(self) -> bool:
        """Whether per-class (category-aware) statistics are matched: recorded with ``stats_per_class``."""
        return False

    def uses_instance_stats(self) -> bool:
        """Whether per-instance BN statistics are matched (docs/method.md Eq. 19): recorded with ``stats_instance``."""
        return False

    def real_batch_size(self) -> int:
        """Real train images the engine draws per iteration for the loss (``SynthesisStep.real_x``);
        0: none (the default; only methods that regress on real data, e.g. ``feature_regression``)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain values, ``syn_method`` first."""
        d = dataclasses.asdict(self)
        return {"syn_method": d.pop("syn_method"), **d}


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
    but ``teachers[teacher_index]``, this iteration's ``teacher.model``, are off). ``group_size``: the
    batch is class-major with this many images per class (the recover engine's jobs), so per-class
    terms may reshape instead of grouping ``labels``; 0: no such layout is promised.

    A loss function may declare its random draws with a ``draw`` attribute,
    ``draw(config, teacher, generator, *, iteration, job_state, scratch) -> dict | None``: the draws of step
    ``iteration`` in the order the loss would make them (CPU tensors, or Python numbers), made ahead of the
    step: the engine draws a whole checkpoint interval at once (:mod:`gvbsm_hf.recover.draws`) and passes
    each step its ``draws`` (on the device). ``scratch`` is a dict the draw function owns for one interval
    (e.g. counters it advances); ``None`` means it needs the teacher's statistics first: that step then draws
    inside the loss from ``generator`` (under ``syn_compile`` the engine runs a probe forward and asks again).
    A loss without ``draw`` gets ``generator`` and draws itself, one iteration at a time. ``loss.not_compilable(config) -> str | None`` says why ``syn_compile`` cannot compile a config's step
    (Python control flow), ``None`` when it can."""

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
    group_size: int = 0
    draws: Optional[dict] = None
    """Random draws the method's ``loss.draw`` made ahead of this step (then ``generator`` is ``None``);
    ``None``: the loss draws from ``generator`` itself."""


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
        return self.select is not None or get_init(config.syn_init).needs_real or config.real_batch_size() > 0


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
        close = get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GVBSMError(f"Unknown synthesis method {name!r}{hint}; registered: {list(_METHODS)}.")
    return _METHODS[name]


def method_config(name: str, args: SynthesisProtocol | None = None, *, baseline: bool = False,
                  **overrides: Any) -> SynthesisConfig:
    """The config of method ``name`` for a run (checked when built: a bad option raises ``RecipeError``).

    Protocol fields come from ``args`` (the recipe's ``SynthesisArguments``) for every method. The
    method's options come from ``args.method_args[name]`` for the main method only
    (``baseline=False``); a baseline uses its own defaults throughout, so a recipe's options for
    ``gvbsm`` never leak into ``sre2l``. ``overrides`` set fields directly.
    """
    method = get_method(name)
    cls = method.config_class
    kwargs: dict[str, Any] = {}
    if args is not None:
        for f in PROTOCOL_FIELDS:
            value = getattr(args, f)
            kwargs[f] = list(value) if isinstance(value, (list, tuple)) else value
        if not baseline:
            options = dict((getattr(args, "method_args", None) or {}).get(name) or {})
            check_method_options(name, options)
            kwargs.update(options)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise GVBSMError(f"{sorted(unknown)} are not fields of {cls.__name__} (method {name!r}).")
    kwargs.update(overrides)
    return cls(syn_method=name, **kwargs)


def check_method_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`RecipeError` naming the method's options when ``options`` has one it lacks."""
    own = get_method(name).config_class.options()
    for key in options:
        if key not in own:
            close = get_close_matches(key, own, n=1)
            owners = [m for m in _METHODS if key in _METHODS[m].config_class.options()]
            hint = (f" (did you mean {close[0]!r}?)" if close else "") + (
                f"; it is an option of {owners}" if owners else "")
            raise RecipeError(f"method_args.{name}.{key}: {key!r} is not an option of synthesis method {name!r}{hint}. "
                              f"Its options: {own}.")


# ------------------------------------------------------------------------------ initialisations

InitFn = Callable[..., "Optional[torch.Tensor]"]


@dataclass(frozen=True)
class InitStrategy:
    """A registered initialisation (``syn_init``): ``fn(job, real, spec, config, teachers, device, cache)``
    returns a job's normalised start images, or ``None`` for Gaussian noise."""

    name: str
    fn: InitFn
    needs_real: bool
    uses_teachers: bool = False
    description: str = ""


_INITS: dict[str, InitStrategy] = {}


def register_init(name: str, *, needs_real: bool, uses_teachers: bool = False) -> Callable[[InitFn], InitFn]:
    """Decorator registering an initialisation strategy under ``name`` (``syn_init: name``)."""

    def decorator(fn: InitFn) -> InitFn:
        if name in _INITS:
            raise GVBSMError(f"An initialisation named {name!r} is already registered; pick another name.")
        _INITS[name] = InitStrategy(name, fn, needs_real, uses_teachers, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def list_inits() -> list[str]:
    """Names of the registered initialisations."""
    return list(_INITS)


def get_init(name: str) -> InitStrategy:
    if name not in _INITS:
        raise GVBSMError(f"Unknown initialisation {name!r}; registered: {list(_INITS)}.")
    return _INITS[name]
