"""The dataset card links only to places that exist (the paper, the package's ``[project.urls]``, the
Hub repos the export names: its published teachers, its source dataset; files inside the exported
folder), and its metadata header holds the dataset facts, the method, IPC and the recipe's
non-default values only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image

from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.export import card as export_card
from gvbsm_hf.export.card import PAPER_URL, project_urls
from gvbsm_hf.export.engine import export_distilled_dataset
from gvbsm_hf.fingerprint import NON_RESULT_FIELDS
from gvbsm_hf.recipe import parse_recipe, recipe_defaults, recipe_to_dict
from gvbsm_hf.relabel.store import StoredSoftLabels
from gvbsm_hf.teacher import TeacherModel

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
    out = {PAPER_URL, f"https://huggingface.co/datasets/{source}", *project_urls().values()}
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


SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "digits" / "smoke.yaml"
UNUSED_TRAINING_ARGUMENTS = (
    "use_liger_kernel", "liger_kernel_config", "neftune_noise_alpha", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "deepspeed", "fsdp", "fsdp_config", "push_to_hub", "push_to_hub_token", "hub_token",
    "hub_strategy", "hub_model_id", "ddp_backend", "ddp_timeout", "tpu_num_cores", "label_smoothing_factor",
    "group_by_length", "length_column_name", "include_for_metrics", "eval_accumulation_steps", "adam_beta1",
    "adam_epsilon", "max_grad_norm", "warmup_ratio", "accelerator_config", "debug",
    "optim_target_modules", "batch_eval_metrics", "average_tokens_across_devices", "full_determinism",
)


def _keys(value) -> set[str]:
    """Every mapping key at any depth of ``value``."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_card_header_holds_the_recipes_non_default_values_only(tmp_path):
    recipe = parse_recipe(["--config", str(SMOKE), "--ipc", "2", "--syn_lr", "0.3"])
    method, defaults = recipe_to_dict(recipe), recipe_defaults()
    g = torch.Generator().manual_seed(2)
    n = 2 * K
    folder = export_distilled_dataset(
        tmp_path / "ex", images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
        labels=torch.arange(n) % K, spec=_spec("org/toy-source"), method=method, defaults=defaults,
        soft_logits=torch.randn(n, K, generator=g), results=RESULTS,
    )
    card = DatasetCard.load(folder / "README.md")
    header = card.data.to_dict()
    assert not _keys(header) & set(UNUSED_TRAINING_ARGUMENTS), _keys(header) & set(UNUSED_TRAINING_ARGUMENTS)
    assert header["method"] == "gvbsm" and header["ipc"] == 2 and header["license"] == "mit"
    assert header["task_categories"] == ["image-classification"] and header["source_datasets"] == ["org/toy-source"]
    assert {"configs", "dataset_info", "size_categories", "tags"} <= set(header)
    settings = header["settings"]
    expected = {k: v for k, v in method.items() if defaults.get(k, object()) != v}
    expected = {k: v for k, v in expected.items() if k not in NON_RESULT_FIELDS | {"syn_method", "ipc"}}
    assert expected and settings == expected  # every non-default value, and nothing else
    assert settings["syn_lr"] == 0.3 and settings["dataset_name"] == "digits"
    assert settings["method_args"] == {"gvbsm": {"syn_dd_pool_size": 32}}
    assert "learning_rate" in settings and "adam_beta2" not in settings and "logging_steps" not in settings
    assert len(card.content.split("---")[1].splitlines()) < 150  # was about 250 fields before
    assert "lists the values that differ from the\ndefaults" in card.text
    # the full recipe stays in the folder, and parses back to the same recipe
    again = parse_recipe(["--config", str(folder / "gvbsm_config.json")])
    assert recipe_to_dict(again) == method


def test_card_links_the_packages_project_urls(tmp_path, monkeypatch):
    urls = {"Paper": PAPER_URL, "Documentation": "https://example.org/gvbsm-hf/docs"}
    monkeypatch.setattr(export_card, "project_urls", lambda: urls)
    n = 4
    folder = export_distilled_dataset(
        tmp_path / "ex", images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), labels=torch.arange(n) % K,
        spec=_spec("org/toy-source"), method=METHOD, source_dataset="org/toy-source",
    )
    text = (folder / "README.md").read_text()
    assert "[Documentation](https://example.org/gvbsm-hf/docs)" in text
    assert set(URL.findall(text)) == {PAPER_URL, "https://example.org/gvbsm-hf/docs",
                                      "https://huggingface.co/datasets/org/toy-source"}
    assert "](gvbsm_config.json)" in text and (folder / "gvbsm_config.json").is_file()


@pytest.mark.parametrize("source,hub", [("org/toy-source", True), ("fashion_mnist", True),
                                        ("sklearn.datasets.load_digits (UCI digits)", False)])
def test_teacher_card_links_only_the_paper_and_a_hub_dataset(tmp_path, source, hub):
    """A teacher's card: the paper, and its dataset in the metadata (a link on the Hub) only when
    that is a Hub id, never a description such as the scikit-learn digits' source."""
    spec = DatasetSpec(name="toy_set", num_classes=K, image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       source=source)
    teacher = TeacherModel.from_backbone("convnet", spec, backbone_kwargs={"width": 4})
    teacher.save_pretrained(tmp_path / "t")
    card = ModelCard.load(tmp_path / "t" / "README.md")
    assert set(URL.findall(card.text)) == {PAPER_URL}
    assert card.data.to_dict().get("datasets") == ([source] if hub else None)
