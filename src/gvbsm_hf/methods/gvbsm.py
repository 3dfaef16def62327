"""G-VBSM and the SRe2L family as registered methods (docs/method.md "Recover", "Baselines and ablations").

One loss (docs/method.md Eq. 2 extended): ``w_ce CE + r_bn L'_BN (Eq. 6) + r_conv L'_Conv (Eq. 10)
+ w_dd L_DD (Eq. 5)``; the baselines are the same loss with other config defaults, never the
main method's recipe values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import bn_matching_loss, conv_matching_loss, data_densification_loss
from .registry import SynthesisConfig, SynthesisStep, register_method


@dataclass
class GVBSMConfig(SynthesisConfig):
    """G-VBSM's defaults (small-dataset settings of the authors' code, docs/method.md)."""

    syn_ce_weight: float = 1.0
    syn_r_bn: float = 0.01
    syn_r_conv: float = 0.01
    syn_first_layer_multiplier: float = 10.0
    syn_alpha: float = 0.8
    syn_beta_dr: float = 0.4
    syn_dd: bool = True
    syn_dd_weight: float = 1.0
    syn_dd_tau: float = 4.0
    syn_dd_pool_size: int = 32

    def uses_bn(self) -> bool:
        return self.syn_r_bn > 0

    def uses_conv(self) -> bool:
        return self.syn_r_conv > 0


@dataclass
class SRe2LConfig(GVBSMConfig):
    """SRe2L: CE + plain BN matching (Eq. 1), one teacher, no Conv statistics, no DD."""

    syn_r_conv: float = 0.0
    syn_alpha: float = 0.0
    syn_dd: bool = False
    syn_single_teacher: bool = True


@dataclass
class SRe2LDDConfig(SRe2LConfig):
    """SRe2L + data densification (Eq. 5)."""

    syn_dd: bool = True


@dataclass
class SRe2LGBMConfig(SRe2LConfig):
    """SRe2L + every backbone (GBM, Eq. 7)."""

    syn_single_teacher: bool = False


def matching_loss(step: SynthesisStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """docs/method.md Eq. 2 extended: CE + BN (Eq. 1/6) + Conv (Eq. 10) + DD (Eq. 5), each on when its weight is.

    The first-layer multiplier goes to the first hooked Conv only (``syn_first_layer="first_conv"``,
    authors) or to the first BN too; ``syn_beta_dr_unit`` drops whole layers or single statistics;
    ``syn_ema_init`` starts the SDS EMAs at zero or at the first statistic (docs/differences.md)."""
    c: GVBSMConfig = step.config  # type: ignore[assignment]
    t = step.teacher
    ce = F.cross_entropy(step.logits.float(), step.labels)
    bn = conv = dd = ce.new_zeros(())
    if c.syn_r_bn > 0:
        bn_multiplier = c.syn_first_layer_multiplier if c.syn_first_layer == "first_bn_and_conv" else 1.0
        bn, step.state["bn"] = bn_matching_loss(
            t.hooks.bn_stats, t.bn_targets, step.state.get("bn"), alpha=c.syn_alpha,
            layer_weights=t.layer_weights("bn", bn_multiplier), ema_init=c.syn_ema_init,
        )
    if c.syn_r_conv > 0:
        conv, step.state["conv"], _ = conv_matching_loss(
            t.hooks.conv_stats, t.conv_targets, step.state.get("conv"), alpha=c.syn_alpha, beta_dr=c.syn_beta_dr,
            generator=step.generator, layer_weights=t.layer_weights("conv", c.syn_first_layer_multiplier),
            drop=c.syn_beta_dr_unit, ema_init=c.syn_ema_init,
        )
    if c.syn_dd:
        dd = data_densification_loss(step.x.float(), step.labels, tau=c.syn_dd_tau, pool_size=c.syn_dd_pool_size,
                                     pool=c.syn_dd_pool)
    loss = c.syn_ce_weight * ce + c.syn_r_bn * bn + c.syn_r_conv * conv + c.syn_dd_weight * dd
    return loss, {"ce": ce, "bn": bn, "conv": conv, "dd": dd}


register_method("gvbsm", config=GVBSMConfig, description="G-VBSM: GBM + BN/Conv matching in SDS form + DD")(matching_loss)
register_method("sre2l", config=SRe2LConfig, description="SRe2L: CE + BN matching, one teacher")(matching_loss)
register_method("sre2l+dd", config=SRe2LDDConfig, description="SRe2L + data densification")(matching_loss)
register_method("sre2l+gbm", config=SRe2LGBMConfig, description="SRe2L + every backbone (GBM)")(matching_loss)
