"""Which dataset to distill and how to read it (the ``DataArguments`` of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..validation import ValidatedArguments, check_range

@dataclass
class DataArguments(ValidatedArguments):
    """Which dataset to distill and how to read it (``gvbsm_hf.data``)."""

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "Built-in name (digits, fashion_mnist, cifar10, cifar100, tiny-imagenet, "
                  "imagenet-1k), a Hub dataset id or a local folder that `datasets` can load."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (auto if None)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (auto if None)."})
    train_split: Optional[str] = field(default=None, metadata={"help": "Train split name (auto if None)."})
    validation_split: Optional[str] = field(
        default=None, metadata={"help": "Validation split name (auto: validation, valid, val or test)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (large datasets)."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Use only this many training images (class-balanced, seeded)."}
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Cap on validation images."})
    dataloader_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes decoding images in the record stage (0: in-process)."}
    )
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Resize every image to image_size x image_size (bilinear); None: the "
                                "built-in size, else the first training image's height (images must then agree)."}
    )
    channels: Optional[Literal[1, 3]] = field(
        default=None, metadata={"help": "Convert every image to 1 (grey, 'L') or 3 (RGB) channels; None: the "
                                "built-in value, else the first training image's mode (images must then agree)."}
    )

    def validate(self) -> None:
        check_range("image_size", self.image_size, 1, allow_none=True)
        check_range("max_train_samples", self.max_train_samples, 1, allow_none=True)
        check_range("max_eval_samples", self.max_eval_samples, 1, allow_none=True)
        check_range("dataloader_workers", self.dataloader_workers, 0)
