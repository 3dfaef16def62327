"""Datasets as ``datasets.DatasetDict`` (``image``: Image, ``label``: ClassLabel) plus what the
rest of the pipeline needs to know about them (:class:`DatasetSpec`).

Modules: :mod:`.spec` (``DatasetSpec``, ``get_dataset_spec``), :mod:`.builtin` (short names:
digits, fashion_mnist, cifar10, ...), :mod:`.loading` (``load_image_dataset``, subsets),
:mod:`.validation` (``validate_image_dataset``), :mod:`.decoding` (tensors, batches and
``DecodedImages``, a split decoded on access). Each dataset's preprocessing (train / eval view,
whole or streamed splits) is declared once: ``Preprocessing`` / ``preprocessing_for`` in :mod:`.builtin`,
carried by the ``DatasetSpec``.
Everything is importable from ``gvbsm_hf.data``.
"""

from .builtin import (
    BUILTIN_DATASETS,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_ENV,
    FASHION_MNIST_NAMES,
    IMAGENET_MEAN,
    IMAGENET_PREPROCESSING,
    IMAGENET_STD,
    SMALL_PREPROCESSING,
    BuiltinDataset,
    Preprocessing,
    get_builtin_dataset,
    preprocessing_for,
)
from .decoded import DecodedImages, decoded_split
from .decoding import image_batches, random_resized_crop_params, to_uint8_tensors
from .inference import get_dataset_spec
from .loading import load_image_dataset
from .sampling import class_balanced_indices, class_balanced_subset, stratified_split
from .spec import DatasetSpec
from .validation import validate_image_dataset

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_PREPROCESSING",
    "IMAGENET_STD",
    "SMALL_PREPROCESSING",
    "BuiltinDataset",
    "DatasetSpec",
    "DecodedImages",
    "Preprocessing",
    "class_balanced_indices",
    "class_balanced_subset",
    "decoded_split",
    "get_builtin_dataset",
    "get_dataset_spec",
    "image_batches",
    "load_image_dataset",
    "preprocessing_for",
    "random_resized_crop_params",
    "stratified_split",
    "to_uint8_tensors",
    "validate_image_dataset",
]
