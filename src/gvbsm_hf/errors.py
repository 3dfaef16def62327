"""Exceptions whose messages say what went wrong *and* how to fix it."""

from __future__ import annotations


class GVBSMError(ValueError):
    """Base class of every error raised on purpose by gvbsm-hf."""


class DataValidationError(GVBSMError):
    """The dataset cannot be distilled as given (missing column, bad label, corrupt image...)."""


class UnknownBackboneError(GVBSMError, KeyError):
    """A backbone name that no registry (zoo, torchvision, timm, Hub) knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OfflineError(GVBSMError, ConnectionError):
    """Something needs the network (Hub, pretrained weights) and it is not reachable."""


class StatisticsMismatchError(GVBSMError):
    """A statistics file does not belong to the teacher / patch size / layers it is used with."""


class NonFiniteLossError(GVBSMError, FloatingPointError):
    """A loss became NaN or inf; the last good checkpoint is kept."""
