"""The files of an exported folder (one ``upload_folder`` commit pushes all of it)::

    README.md                                  dataset card (YAML metadata + configs block)
    data/train-00000-of-00001.parquet          config "default": image, label, soft labels, slot metadata
    statistics/train-00000-of-00001.parquet    config "statistics": global Conv statistics (Eq. 9)
    views/train-00000-of-00001.parquet         config "views": stored relabel views + logits (Eq. 8)
    grid.png                                   one row of images per class
    gvbsm_config.json                          the recipe (``--config`` of recipes/distill.py)
    gvbsm_export.json                          DatasetSpec, soft-label format, views metadata
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_FILE = "data/train-00000-of-00001.parquet"
STATISTICS_FILE = "statistics/train-00000-of-00001.parquet"
VIEWS_FILE = "views/train-00000-of-00001.parquet"
CONFIG_FILE = "gvbsm_config.json"
EXPORT_FILE = "gvbsm_export.json"
CARD_FILE = "README.md"
CONFIG_FILES = {"default": DATA_FILE, "statistics": STATISTICS_FILE, "views": VIEWS_FILE}
"""``datasets`` config name -> its parquet file."""
EXPORT_FORMAT_VERSION = 1


def export_sizes(folder: str | Path) -> dict[str, Any]:
    """Megabytes of the images (``default`` config) and of the stored views (``views``), and their ratio."""
    folder = Path(folder)
    image = (folder / CONFIG_FILES["default"]).stat().st_size
    views = (folder / CONFIG_FILES["views"]).stat().st_size if (folder / CONFIG_FILES["views"]).exists() else 0
    return {"image_mb": round(image / 2**20, 3), "label_mb": round(views / 2**20, 3),
            "ratio": round(views / image, 1) if image else None}
