"""Student-aware synthesis by kernel ridge regression on a pool of student networks: the
``feature_regression`` method (docs/method.md "Beyond G-VBSM", Eq. 12).

G-VBSM, RDED and EDC never ask what a *student* learns from the images. This method does, with the
closed-form inner solver of FRePo (Zhou et al., NeurIPS 2022) adapted to the soft-label protocol:
the labels are not learned but the teachers' logits on the synthetic views, as in the student's
own training (Eq. 11). At every iteration of a job (its ``N`` images ``x``):

1. the engine augments the batch (``x̃ = A(x)``, ``syn_augment``) and one teacher ``t`` gives
   ``T_S = t(x̃)`` (GBM round robin / uniform, Eq. 7), differentiable w.r.t. the pixels
   (``syn_fr_label_grad``: the labels move with the images, as they do in the student's relabel);
2. the engine draws a class-balanced batch of ``B = syn_fr_real_batch`` real train images ``r`` of
   the job's classes; ``T_R = t(r)`` (no gradient);
3. one network ``g_m`` of a pool of ``P = syn_fr_pool_size`` networks of the student architecture
   (``syn_fr_backbone``, BatchNorm in train mode) gives features ``Φ_S = φ_m(x̃)`` and ``Φ_R = φ_m(r)``,
   ``φ`` the input of its last ``nn.Linear`` (a forward pre-hook, no per-architecture code);
4. the loss is Eq. 12, the error on the real batch of the ridge regressor fitted to the synthetic
   views' teacher logits::

       K_SS = Φ_S Φ_Sᵀ,  K_RS = Φ_R Φ_Sᵀ,  λ = ρ · tr(K_SS) / N
       L_FR = 1/(B K) ‖ K_RS (K_SS + λ I)⁻¹ T_S − T_R ‖²_F          (ρ = syn_fr_ridge)

5. ``g_m`` then takes one Adam step (``syn_fr_model_lr``) on the student's MSE to ``T_S`` (detached)
   on the same views, and is re-initialised (a fresh seeded draw) after ``syn_fr_online_steps``
   steps, so the pool always holds students at several stages of training. With ``syn_fr_stagger``
   network ``m``'s first life is ``ceil((m + 1) / P · syn_fr_online_steps)`` steps, so the pool's
   re-draws are spread out instead of simultaneous.

With ``syn_fr_targets: ensemble`` both ``T_S`` and ``T_R`` are the mean logits of all synthesis
teachers (Eq. 8 without LN, the relabel stage's default soft-label source) instead of the
iteration's teacher ``t``; ``T_S`` stays differentiable under ``syn_fr_label_grad``.

The pool lives in the job's ``job_state`` (parameters, Adam moments, ages, as tensors): it is
checkpointed with the pixels and a resumed job continues to the same images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..backbones import create_backbone, is_backbone_name
from ..errors import GVBSMError
from ..losses import ensemble_logits
from .selection import last_linear
from ..validation import RecipeError, check_range
from .registry import SynthesisConfig, SynthesisStep, register_method

FRTargets = Literal["teacher", "ensemble"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class FeatureRegressionConfig(SynthesisConfig):
    """``feature_regression``: images whose teacher-labelled views, regressed on a student's features,
    predict the teachers on real images (Eq. 12)."""

    syn_init: str = "real"
    syn_fr_backbone: str = field(
        default="convnet128", metadata={"help": "Backbone of the pool of student networks whose features the ridge "
                                        "regression uses (Eq. 12); the evaluation student's architecture."})
    syn_fr_pool_size: int = field(default=4, metadata={"help": "Networks in the pool, used in turn."})
    syn_fr_online_steps: int = field(
        default=100, metadata={"help": "Training steps of a pool network on the synthetic views before it is re-initialised."})
    syn_fr_model_lr: float = field(default=1e-3, metadata={"help": "Adam lr of the pool networks."})
    syn_fr_real_batch: int = field(
        default=256, metadata={"help": "Real train images per iteration (class-balanced over the job's classes) on "
                               "which the regression is scored."})
    syn_fr_ridge: float = field(default=1e-3, metadata={"help": "Ridge rho, lambda = rho * tr(K_SS) / N (Eq. 12)."})
    syn_fr_label_grad: bool = field(
        default=True, metadata={"help": "Differentiate through the teacher's logits of the synthetic views (the labels "
                                "move with the images)."})
    syn_fr_targets: FRTargets = field(
        default="teacher", metadata={"help": "The regression targets T_S, T_R are the iteration's teacher ('teacher', "
                                     "GBM) or the mean logits of all synthesis teachers ('ensemble', Eq. 8 without LN)."})
    syn_fr_stagger: bool = field(
        default=False, metadata={"help": "Stagger the pool's first lifetimes (network m is first re-drawn after "
                                 "(m+1)/P * syn_fr_online_steps steps) so the pool always holds networks of several ages."})

    def validate(self) -> None:
        super().validate()
        for name in ("syn_fr_pool_size", "syn_fr_online_steps", "syn_fr_real_batch"):
            check_range(name, getattr(self, name), 1)
        check_range("syn_fr_model_lr", self.syn_fr_model_lr, 0, low_open=True)
        check_range("syn_fr_ridge", self.syn_fr_ridge, 0, low_open=True)
        if not is_backbone_name(self.syn_fr_backbone):
            raise RecipeError(f"syn_fr_backbone={self.syn_fr_backbone!r} is not a known backbone: use a zoo name "
                              "(gvbsm_hf.backbones.list_backbones()), 'tv:<name>', 'timm:<name>' or 'hf-hub:<repo>'.")

    def real_batch_size(self) -> int:
        return int(self.syn_fr_real_batch)


def kernel_ridge_predictions(phi_s: torch.Tensor, phi_r: torch.Tensor, targets_s: torch.Tensor,
                             ridge: float) -> torch.Tensor:
    """``K_RS (K_SS + λ I)⁻¹ T_S`` of Eq. 12, ``λ = ridge · tr(K_SS) / N``; computed in float64, returned
    in ``targets_s``'s dtype. ``phi_s (N, D)``, ``phi_r (B, D)``, ``targets_s (N, K)`` -> ``(B, K)``."""
    s, r, t = phi_s.double(), phi_r.double(), targets_s.double()
    k_ss = s @ s.T
    lam = float(ridge) * torch.diagonal(k_ss).sum() / s.shape[0]
    eye = torch.eye(s.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    # K_SS + lambda I is symmetric positive definite: Cholesky, whose _ex form checks nothing on the host
    chol, _ = torch.linalg.cholesky_ex(k_ss + lam * eye)
    alpha = torch.cholesky_solve(t, chol)
    return ((r @ s.T) @ alpha).to(targets_s.dtype)


def feature_regression_loss(phi_s: torch.Tensor, phi_r: torch.Tensor, targets_s: torch.Tensor,
                            targets_r: torch.Tensor, ridge: float) -> torch.Tensor:
    """Eq. 12: mean squared error of :func:`kernel_ridge_predictions` against the real batch's ``targets_r``."""
    return F.mse_loss(kernel_ridge_predictions(phi_s, phi_r, targets_s, ridge), targets_r.to(targets_s.dtype))


class StudentPool:
    """The pool of step 3-5: one template module of ``syn_fr_backbone`` run functionally
    (``torch.func.functional_call``) on parameter sets kept as tensors in ``state``."""

    _templates: dict[tuple, tuple[nn.Module, nn.Linear]] = {}

    def __init__(self, config: FeatureRegressionConfig, num_classes: int, channels: int, size: int,
                 device: torch.device) -> None:
        self.config, self.num_classes, self.channels, self.size, self.device = config, num_classes, channels, size, device
        key = (config.syn_fr_backbone, num_classes, channels, size, str(device))
        if key not in self._templates:
            model = create_backbone(config.syn_fr_backbone, num_classes=num_classes, in_chans=channels,
                                    image_size=size).to(device).train()
            for p in model.parameters():
                p.requires_grad_(False)
            head = last_linear(model, reader=f"feature_regression (syn_fr_backbone={config.syn_fr_backbone!r})",
                               fix="pick a backbone with a linear classifier (e.g. convnet128, resnet18)")
            self._templates[key] = (model, head)
        self.template, self.head = self._templates[key]

    def fresh_parameters(self, seed: int) -> dict[str, torch.Tensor]:
        """A new initialisation of the backbone (its own ``reset_parameters``) from ``seed``
        (:func:`draw_pool_seed`)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_backbone(self.config.syn_fr_backbone, num_classes=self.num_classes,
                                    in_chans=self.channels, image_size=self.size)
        return {n: p.detach().to(self.device) for n, p in model.named_parameters()}

    @contextlib.contextmanager
    def features(self) -> Iterator[list[torch.Tensor]]:
        """While open, every forward appends the flattened input of the head to the yielded list."""
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].flatten(1)))
        try:
            yield seen
        finally:
            handle.remove()

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of ``x`` under ``params`` (BatchNorm on the batch's statistics)."""
        with self.features() as seen:
            logits = functional_call(self.template, params, (x,), strict=False)
        return seen[-1], logits


def _adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step (``torch.optim.Adam`` defaults, no weight decay), out of place."""
    b1, b2 = ADAM_BETAS
    exp_avg = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * grad * grad
    denom = (exp_avg_sq / (1 - b2 ** step)).sqrt() + ADAM_EPS
    return param - lr * (exp_avg / (1 - b1 ** step)) / denom, exp_avg, exp_avg_sq


def pool_lifetime(index: int, pool_size: int, online_steps: int, *, first: bool) -> int:
    """Steps pool network ``index`` trains before it is re-drawn: ``online_steps``, or with ``first``
    (``syn_fr_stagger``, the network's first life) ``ceil((index + 1) / pool_size * online_steps)``."""
    if not first:
        return online_steps
    return max(1, -(-(index + 1) * online_steps // pool_size))


def draw_pool_seed(generator: torch.Generator) -> int:
    """The seed of a re-drawn pool network: one draw from the job's generator."""
    return int(torch.randint(2**62, (1,), generator=generator))


def _redraws(config: "FeatureRegressionConfig", entry: dict | None) -> bool:
    """Whether the pool network of ``entry`` (``None``: never drawn) is re-drawn before this step."""
    return entry is None or int(entry["age"]) >= int(entry.get("life", config.syn_fr_online_steps))


def draw_pool(config: "FeatureRegressionConfig", teacher, generator: torch.Generator, *, iteration: int,
              job_state: dict, scratch: dict, **_: object) -> dict:
    """The random draws of step ``iteration``, made ahead of it (a checkpoint interval at once): the seed of
    the pool network the step re-draws, ``{"seed": int}``, or ``{}``. ``scratch`` follows the networks' ages
    over the interval (filled from ``job_state``, the pool as the interval starts), so the draws are the
    step's own."""
    m = iteration % int(config.syn_fr_pool_size)
    if m not in scratch:
        entry = job_state.get("pool", {}).get(str(m))
        scratch[m] = None if entry is None else {"age": int(entry["age"]),
                                                 "life": int(entry.get("life", config.syn_fr_online_steps))}
    entry = scratch[m]
    if _redraws(config, entry):
        life = pool_lifetime(m, int(config.syn_fr_pool_size), int(config.syn_fr_online_steps),
                             first=entry is None and bool(config.syn_fr_stagger))
        scratch[m] = {"age": 1, "life": life}
        return {"seed": draw_pool_seed(generator)}
    entry["age"] += 1
    return {}


def regression_targets(step: SynthesisStep, *, ensemble: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_S, T_R)`` of Eq. 12 in float32: the iteration's teacher on the synthetic views (differentiable)
    and on the real batch (no gradient), or with ``ensemble`` the mean logits of every teacher in
    ``step.teachers`` (Eq. 8 without LN; the iteration's own logits are reused, not recomputed)."""
    if not ensemble or len(step.teachers) <= 1:
        with torch.no_grad():
            targets_r = step.teacher.model(step.real_x).float()
        return step.logits.float(), targets_r
    views = [step.logits if i == step.teacher_index else t(step.x) for i, t in enumerate(step.teachers)]
    with torch.no_grad():
        targets_r = ensemble_logits([t(step.real_x) for t in step.teachers])
    return ensemble_logits(views), targets_r


@register_method("feature_regression", config=FeatureRegressionConfig,
                 description="Student-aware synthesis: kernel ridge regression on a pool of student networks (Eq. 12)")
def feature_regression_step(step: SynthesisStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 12 for one iteration (module docstring, steps 3-5); trains the pool's current network once."""
    config: FeatureRegressionConfig = step.config  # type: ignore[assignment]
    if step.real_x is None:
        raise GVBSMError("feature_regression needs a real batch every iteration (the recover engine draws "
                         "syn_fr_real_batch real images when real_train is given).")
    x = step.x
    pool = StudentPool(config, step.logits.shape[1], x.shape[1], x.shape[-1], x.device)
    state = step.job_state
    m = step.iteration % int(config.syn_fr_pool_size)
    entry = state.get("pool", {}).get(str(m))
    if entry is not None and "life" not in entry:  # a checkpoint written before lifetimes were stored
        entry = {**entry, "life": torch.tensor(int(config.syn_fr_online_steps), dtype=torch.long)}
    if _redraws(config, entry):
        life = pool_lifetime(m, int(config.syn_fr_pool_size), int(config.syn_fr_online_steps),
                             first=entry is None and bool(config.syn_fr_stagger))
        if step.draws is None:
            seed = draw_pool_seed(step.generator)
        elif "seed" in step.draws:  # drawn ahead of the step (draw_pool)
            seed = step.draws["seed"]
        else:
            raise GVBSMError(f"feature_regression: the draws made ahead of step {step.iteration} have no seed for "
                             f"pool network {m}, which this step re-draws; the pool state changed after the draws.")
        params = pool.fresh_parameters(seed)
        entry = {"age": torch.zeros((), dtype=torch.long),
                 "life": torch.tensor(life, dtype=torch.long),
                 "params": params,
                 "exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
                 "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()}}
    params = {n: p.detach().requires_grad_(True) for n, p in entry["params"].items()}

    targets_s, targets_r = regression_targets(step, ensemble=config.syn_fr_targets == "ensemble")
    if not config.syn_fr_label_grad:
        targets_s = targets_s.detach()
    with torch.no_grad():
        phi_r, _ = pool.forward({n: p.detach() for n, p in params.items()}, step.real_x)
    phi_s, logits_s = pool.forward(params, x)
    loss = feature_regression_loss(phi_s, phi_r, targets_s, targets_r, config.syn_fr_ridge)

    # step 5: the pool network learns from the same views as a student would (MSE to T_S, detached)
    student_loss = F.mse_loss(logits_s, targets_s.detach())
    grads = torch.autograd.grad(student_loss, list(params.values()), retain_graph=True)
    age = int(entry["age"]) + 1
    new_params, new_avg, new_sq = {}, {}, {}
    for (name, p), g in zip(params.items(), grads):
        new_params[name], new_avg[name], new_sq[name] = _adam_update(
            p.detach(), g, entry["exp_avg"][name], entry["exp_avg_sq"][name], age, config.syn_fr_model_lr)
    state.setdefault("pool", {})[str(m)] = {"age": torch.tensor(age, dtype=torch.long), "life": entry["life"],
                                            "params": new_params, "exp_avg": new_avg, "exp_avg_sq": new_sq}
    return loss, {"feature_regression": loss.detach(), "pool_student_mse": student_loss.detach()}


feature_regression_step.draw = draw_pool  # type: ignore[attr-defined]
feature_regression_step.not_compilable = (  # type: ignore[attr-defined]
    lambda config: "re-draws its pool networks in Python control flow")
