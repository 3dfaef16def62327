"""The dataset card links only to places that exist: the paper, the Hub repos the export names
(its own id, its published teachers, its source dataset) and files inside the exported folder."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.export.card import PAPER_URL
from gvbsm_hf.export.engine import export_distilled_dataset
from gvbsm_hf.relabel.store import StoredSoftLabels

K = 4
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s)\]>\"'`]+")
LINK_TARGET = re.compile(r"\]\(([^)\s]*)\)")
METHOD = {"syn_method": "gvbsm", "ipc": 2, "syn_lr": 0.1, "teachers": ["convnet32"], "student": "convnet32",
          "output_dir": "outputs/run"}
RESULTS = [{"method": "gvbsm", "labels": "soft", "evaluator": "convnet32", "mean": 50.0, "std": 1.0, "n": 2}]


def _spec(source: str) -> DatasetSpec:
    return DatasetSpec(name="toy_set", num_classes=K, image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       class_names=("a", "b", "c", "d"), license="MIT", source=source)


def _stored(n: int, g: torch.Generator) -> StoredSoftLabels:
    xy = torch.rand(n, 2, 2, generator=g) * 2
    return StoredSoftLabels(boxes=torch.cat([xy, xy + 6], dim=-1), flip=torch.rand(n, 2, generator=g) > 0.5,
                            num_classes=K, image_size=(8, 8), out_size=8,
                            logits=torch.randn(n, 2, K, generator=g).half())


def _allowed(repo_id: str | None, teachers: list[str], source: str) -> set[str]:
    out = {PAPER_URL, f"https://huggingface.co/datasets/{source}"}
    out |= {f"https://huggingface.co/{t}" for t in teachers}
    if repo_id:
        out |= {f"https://huggingface.co/datasets/{repo_id}"}
    return out


@pytest.mark.parametrize("published", [True, False])
def test_card_links_only_to_the_paper_its_hub_repos_and_its_own_files(tmp_path, published):
    g = torch.Generator().manual_seed(0)
    n = 8
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % K
    grid = tmp_path / "grid_src.png"
    Image.new("RGB", (16, 16)).save(grid)
    repo_id, teachers = ("me/toy-gvbsm-ipc2", ["me/toy-convnet32"]) if published else (None, [])
    source = "org/toy-source"
    folder = export_distilled_dataset(
        tmp_path / "ex", images=images, labels=labels, spec=_spec(source), method=METHOD,
        soft_logits=torch.randn(n, K, generator=g), stored_views=_stored(n, g), results=RESULTS, grid_path=grid,
        repo_id=repo_id, teacher_repos=teachers or None, teacher_names=None if published else ["convnet32"],
        source_dataset=source,
    )
    text = (folder / "README.md").read_text()
    urls = set(URL.findall(text))
    assert PAPER_URL in urls
    assert urls <= _allowed(repo_id, teachers, source), urls - _allowed(repo_id, teachers, source)
    assert "github.com" not in text
    targets = LINK_TARGET.findall(text)
    assert targets, "the card has markdown links"
    for target in targets:
        if URL.fullmatch(target):
            continue  # checked above
        assert not target.startswith("/") and "://" not in target, target
        if not target.startswith("#"):
            assert (folder / target).is_file(), f"relative link {target!r} names no file of the export"
    assert "](grid.png)" in text and "](data/train-00000-of-00001.parquet)" in text


def test_card_of_a_local_source_links_no_source(tmp_path):
    g = torch.Generator().manual_seed(1)
    n = 4
    local = tmp_path / "my_images"
    local.mkdir()
    folder = export_distilled_dataset(
        tmp_path / "ex", images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
        labels=torch.arange(n) % K, spec=_spec(str(local)), method=METHOD, source_dataset=str(local),
    )
    text = (folder / "README.md").read_text()
    assert set(URL.findall(text)) == {PAPER_URL}
    assert "](#source-data-and-license)" in text
