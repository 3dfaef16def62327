"""gvbsm-hf: HuggingFace-native dataset distillation with G-VBSM (CVPR 2024)."""

__version__ = "0.1.0"
