"""Backbones: timm-style registry over the small-image zoo, torchvision, timm and the Hub."""

from . import zoo  # noqa: F401  (registers the zoo backbones)
from .registry import (
    create_backbone,
    has_pretrained_weights,
    is_backbone_name,
    list_backbones,
    register_backbone,
    unknown_backbone_message,
)

__all__ = [
    "create_backbone", "has_pretrained_weights", "is_backbone_name", "list_backbones", "register_backbone",
    "unknown_backbone_message",
]
