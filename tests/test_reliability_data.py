"""Issue 18: data, backbone-name and teacher-pretraining defects. Every fix hint names a recipe
field or flag (`field: value` in the recipe, --field value), never a Python call."""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from torch import nn

import gvbsm_hf.pipeline as pipeline
import gvbsm_hf.squeeze.stage
import gvbsm_hf.teacher
from gvbsm_hf import hub_utils
from gvbsm_hf.backbones import create_backbone, list_backbones
from gvbsm_hf.backbones.registry import _OFFLINE_FIX, unknown_backbone_message
from gvbsm_hf.data import (
    get_dataset_spec,
    load_image_dataset,
    to_uint8_tensors,
    validate_image_dataset,
)
from gvbsm_hf.errors import DataValidationError, GVBSMError, UnknownBackboneError
from gvbsm_hf.pipeline import run_pipeline
from gvbsm_hf.recipe import parse_recipe
from gvbsm_hf.stage import StageContext
from gvbsm_hf.stage_cache import StageCache
from gvbsm_hf.stages import STAGE_REGISTRY
from gvbsm_hf.teacher import TeacherModel
from gvbsm_hf.validation import RecipeError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "digits" / "smoke.yaml"
DISTILL = REPO / "recipes" / "distill.py"


def _parse(*extra: str):
    return parse_recipe(["--config", str(SMOKE), *extra])


def _recipe_yaml(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(SMOKE.read_text()) | changes
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_recipe_hint(msg: str, field: str, value: str) -> None:
    """The message names the recipe field and the flag, and no Python call."""
    assert f"`{field}: {value}`" in msg and f"--{field} {value}" in msg, msg
    assert "load_image_dataset" not in msg and "get_dataset_spec" not in msg, msg
    assert not re.search(r"\bdatasets?\.\w+\(", msg), msg  # dataset.map(...), datasets.ClassLabel(...)
    assert not re.search(rf"\b{field}=", msg), msg  # image_size=N / channels=3 are Python keywords


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _dsd(train_images, train_labels, val_images, val_labels, names=("a", "b", "c")):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})

    def split(images, labels):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(a), "path": None} for a in images], "label": list(labels)}, features=features
        )

    return datasets.DatasetDict({"train": split(train_images, train_labels),
                                 "validation": split(val_images, val_labels)})


def _rgb(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _write_folder(root: Path, classes: dict[str, int], *, size=(8, 8), mode="RGB", seed=0) -> None:
    """``root/<class>/<i>.png`` with ``classes[c]`` images each (0: an empty class folder)."""
    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


# ------------------------------------------------------------- 1. image_size / channels are recipe fields


def test_image_size_and_channels_are_recipe_fields(tmp_path):
    r = _parse("--image_size", "12", "--channels", "3")
    assert (r.data.image_size, r.data.channels) == (12, 3)
    r = parse_recipe(["--config", str(_recipe_yaml(tmp_path, image_size=20, channels=1))])
    assert (r.data.image_size, r.data.channels) == (20, 1)
    assert (_parse().data.image_size, _parse().data.channels) == (None, None)
    with pytest.raises(RecipeError, match="channels"):
        parse_recipe(["--config", str(_recipe_yaml(tmp_path, channels=2))])
    with pytest.raises(RecipeError, match="image_size"):
        parse_recipe(["--config", str(_recipe_yaml(tmp_path, image_size=0))])
    with pytest.raises(SystemExit):  # argparse choices
        _parse("--channels", "2")


def test_run_pipeline_passes_image_size_and_channels_to_the_data_layer(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(name, **kw):
        seen["load"] = kw
        return "dataset"

    def fake_spec(dataset, name, **kw):
        seen["spec"] = kw
        raise Stop

    monkeypatch.setattr(pipeline, "load_image_dataset", fake_load)  # the names run_pipeline calls
    monkeypatch.setattr(pipeline, "get_dataset_spec", fake_spec)
    with pytest.raises(Stop):
        run_pipeline(_parse("--image_size", "12", "--channels", "3", "--output_dir", str(tmp_path / "out")))
    assert (seen["load"]["image_size"], seen["load"]["channels"]) == (12, 3)
    assert (seen["spec"]["image_size"], seen["spec"]["channels"]) == (12, 3)


def test_data_layer_resizes_and_converts_to_image_size_and_channels(tmp_path):
    _write_folder(tmp_path / "train", {"a": 2, "b": 2}, size=(8, 8))
    for c in ("a", "b"):  # plus a grey, non-square image per class
        Image.fromarray(np.zeros((10, 12), np.uint8), "L").save(tmp_path / "train" / c / "grey.png")
    _write_folder(tmp_path / "validation", {"a": 1, "b": 1}, size=(8, 8))
    with pytest.raises(DataValidationError) as e:
        load_image_dataset(str(tmp_path))
    _assert_recipe_hint(str(e.value), "image_size", "N")
    for channels in (3, 1):
        dsd = load_image_dataset(str(tmp_path), image_size=16, channels=channels)
        spec = get_dataset_spec(dsd, str(tmp_path), image_size=16, channels=channels)
        assert (spec.image_size, spec.channels, len(spec.mean), len(spec.std)) == (16, channels, channels, channels)
        x, _ = to_uint8_tensors(dsd["train"], spec)
        assert x.shape == (len(dsd["train"]), channels, 16, 16)


def test_builtin_dataset_converted_to_rgb_has_one_mean_per_channel():
    dsd = load_image_dataset("digits", max_train_samples=30, max_eval_samples=10, image_size=8, channels=3)
    spec = get_dataset_spec(dsd, "digits", image_size=8, channels=3)
    assert (spec.image_size, spec.channels) == (8, 3)
    grey = get_dataset_spec(dsd, "digits")
    assert spec.mean == grey.mean * 3 and spec.std == grey.std * 3  # the grey value copied on R, G, B
    x, _ = to_uint8_tensors(dsd["train"], spec)
    assert x.shape == (30, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2])

    TeacherModel.from_backbone("convnet32", spec)  # mean/std fit in_chans


def test_data_fix_hints_name_recipe_fields():
    # non-square
    dsd = _dsd([np.zeros((8, 10, 3), np.uint8)] * 3, [0, 1, 2], [np.zeros((8, 10, 3), np.uint8)], [0])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    _assert_recipe_hint(str(e.value), "image_size", "N")
    # mixed sizes
    dsd = _dsd(_rgb(2, size=8) + _rgb(1, size=12), [0, 1, 2], _rgb(1), [0])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    _assert_recipe_hint(str(e.value), "image_size", "N")
    # mixed channels
    dsd = _dsd(_rgb(2) + [np.zeros((8, 8), np.uint8)], [0, 1, 2], _rgb(1), [0])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    _assert_recipe_hint(str(e.value), "channels", "3")
    # missing column, missing split, unlabelled rows
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(_dsd(_rgb(3), [0, 1, 2], _rgb(1), [0]).rename_column("label", "target"))
    _assert_recipe_hint(str(e.value), "label_column", "<one of them>")
    with pytest.raises(DataValidationError) as e:
        load_image_dataset("digits", validation_split="dev")
    _assert_recipe_hint(str(e.value), "validation_split", "<one of them>")
    dsd = _dsd(_rgb(3), [0, 1, 2], _rgb(2), [0, 1])
    dsd["validation"] = dsd["validation"].cast_column("label", datasets.Value("int64")).map(
        lambda r, i: {"label": -1 if i == 1 else r["label"]}, with_indices=True)
    dsd["validation"] = dsd["validation"].cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    _assert_recipe_hint(str(e.value), "validation_split", "<a labelled split>")


# ------------------------------------------------------------- 2. empty class folders, validation-only labels


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_empty_class_folder_is_reported_not_dropped(tmp_path, layout):
    root = tmp_path / "data"
    classes = {"apple": 3, "kiwi": 3, "pear": 3, "plum": 0}
    if layout == "splits":
        _write_folder(root / "train", classes)
        _write_folder(root / "validation", {"apple": 1, "kiwi": 1, "pear": 1, "plum": 0})
    else:
        _write_folder(root, classes)
    with pytest.raises(DataValidationError) as e:
        load_image_dataset(str(root))
    msg = str(e.value)
    empty = root / "train" / "plum" if layout == "splits" else root / "plum"
    assert str(empty) in msg and "'plum'" in msg and "3 classes instead of 4" in msg
    assert "Add images" in msg and "remove the folder" in msg
    if layout == "splits":  # validation images of plum, none in train: the train folder is still named
        _write_folder(root / "validation", {"plum": 1})
        with pytest.raises(DataValidationError) as e:
            load_image_dataset(str(root))
        assert str(empty) in str(e.value) and "no training images" in str(e.value)
    (empty / "0.png").write_bytes((root / ("train/apple" if layout == "splits" else "apple") / "0.png").read_bytes())
    dsd = load_image_dataset(str(root))
    assert dsd["train"].features["label"].names == ["apple", "kiwi", "pear", "plum"]


def test_empty_class_folder_of_one_split_only_is_not_an_error(tmp_path):
    """A class with images in train but an empty validation folder is not dropped: no error."""
    _write_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    _write_folder(tmp_path / "validation", {"a": 1, "b": 1, "c": 0})
    dsd = load_image_dataset(str(tmp_path))
    assert dsd["train"].features["label"].num_classes == 3


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_a_single_class_image_folder_is_named_as_such(tmp_path, layout):
    """One class folder: datasets adds no label column; the error says one class, not "label column missing"."""
    root = tmp_path / "data"
    if layout == "splits":
        _write_folder(root / "train", {"cat": 3})
        _write_folder(root / "validation", {"cat": 1})
    else:
        _write_folder(root, {"cat": 3})
    t0 = time.perf_counter()
    with pytest.raises(DataValidationError) as e:
        load_image_dataset(str(root))
    msg = str(e.value)
    assert "has one class ('cat'" in msg and "at least two classes" in msg and "missing" not in msg, msg
    assert time.perf_counter() - t0 < 10
    # a dataset whose ClassLabel has one class (e.g. string labels with one value)
    dsd = _dsd(_rgb(2), [0, 0], _rgb(1), [0], names=("cat",))
    with pytest.raises(DataValidationError, match=r"1 class \(\['cat'\]\): distillation needs at least two"):
        validate_image_dataset(dsd)


def test_label_only_in_validation_names_split_row_label_and_fix():
    dsd = _dsd(_rgb(4), [0, 1, 0, 1], _rgb(3, seed=1), [0, 2, 1], names=("cat", "dog", "emu"))
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    msg = str(e.value)
    assert "'emu'" in msg and "split 'validation'" in msg and "row 1" in msg
    assert "Add training images of 'emu'" in msg and "`validation_split:" in msg and "--validation_split" in msg


def test_label_only_in_validation_folder_names_the_file(tmp_path):
    _write_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _write_folder(tmp_path / "validation", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(DataValidationError) as e:
        load_image_dataset(str(tmp_path))
    msg = str(e.value)
    assert "'emu'" in msg and "split 'validation'" in msg and re.search(r"at row \d+", msg)
    assert str(tmp_path / "validation" / "emu" / "0.png") in msg


# ------------------------------------------------------------- 3. unknown backbone: zoo suggestions first


def _load_distill():
    spec = importlib.util.spec_from_file_location("distill_under_test", DISTILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("typo, meant", [("convnte32_d2", "convnet32_d2"), ("mobilenetv2_05", "mobilenetv2_050")])
def test_teacher_typo_fails_at_parse_time_with_the_zoo_name_first(tmp_path, monkeypatch, typo, meant):
    def no_training(*a, **k):
        raise AssertionError("a teacher was trained")

    monkeypatch.setattr(gvbsm_hf.squeeze.stage, "train_teacher", no_training)
    distill = _load_distill()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(UnknownBackboneError) as e:
        distill.main(["--config", str(SMOKE), "--teachers", "convnet32", typo, "--output_dir", str(out)])
    assert time.perf_counter() - t0 < 10
    assert not (out / "teachers").exists()
    msg = str(e.value)
    assert msg.startswith("teachers:") and f"'{typo}'" in msg
    suggestions = re.search(r"Did you mean: ([^?]+)\?", msg).group(1).split(", ")
    assert suggestions[0] == meant  # the zoo name, before timm's mobilenetv2_075


@pytest.mark.parametrize("bad", ["convnte32_d2", "convnet12", "resnet18cifar", "resnt18", "mobilenetv2_05"])
def test_unknown_backbone_lists_zoo_then_torchvision_then_timm(bad):
    suggestions = re.search(r"Did you mean: ([^?]+)\?", unknown_backbone_message(bad)).group(1).split(", ")
    zoo = set(list_backbones())
    rank = [0 if s in zoo else 1 if s.startswith("tv:") else 2 for s in suggestions]
    assert rank == sorted(rank) and rank[0] == 0


# ------------------------------------------------------------- 4. teacher_pretrained per teacher


def test_mixed_zoo_and_pretrained_teachers_parse():
    r = _parse("--teachers", "convnet32", "tv:resnet18", "--teacher_pretrained", "true")
    assert r.squeeze.teachers == ["convnet32", "tv:resnet18"] and r.squeeze.teacher_pretrained
    _parse("--teachers", "tv:resnet18", "timm:resnet18", "--teacher_pretrained", "true", "--teacher_epochs", "0")


def test_teacher_epochs_zero_names_the_zoo_teachers_left_untrained():
    with pytest.raises(RecipeError) as e:
        _parse("--teachers", "convnet32", "tv:resnet18", "--teacher_pretrained", "true", "--teacher_epochs", "0")
    msg = str(e.value)
    assert "['convnet32']" in msg and "tv:resnet18" not in msg
    assert "`teacher_epochs: N`" in msg and "--teacher_epochs N" in msg and "`teachers:`" in msg
    with pytest.raises(RecipeError) as e:
        _parse("--teachers", "tv:resnet18", "--teacher_epochs", "0")
    msg = str(e.value)
    assert "tv:resnet18" in msg and "`teacher_pretrained: true`" in msg and "--teacher_pretrained true" in msg


def test_fix_hints_of_pretrained_errors_name_recipe_fields():
    with pytest.raises(GVBSMError) as e:
        create_backbone("convnet32", num_classes=10, pretrained=True)
    msg = str(e.value)
    assert "`teacher_pretrained: true`" in msg and "`teacher_epochs: N`" in msg
    assert "gvbsm_hf." not in msg and "train_teacher" not in msg
    assert "`teacher_pretrained: false`" in _OFFLINE_FIX and "`teachers:`" in _OFFLINE_FIX
    assert "save_pretrained" not in _OFFLINE_FIX


def _tiny_backbone_factory(calls, real_create):
    def fake(name, num_classes, in_chans=3, image_size=32, pretrained=False, **kw):
        calls.append((name, pretrained))
        if pretrained and name in list_backbones():
            return real_create(name, num_classes, in_chans, image_size, pretrained=True, **kw)  # the zoo error
        torch.manual_seed(len(calls))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * image_size * image_size, num_classes))

    return fake


def _squeeze_context(recipe, out: Path):
    dsd = load_image_dataset("digits", max_train_samples=40, max_eval_samples=20)
    spec = get_dataset_spec(dsd, "digits")
    return StageContext(recipe=recipe, accelerator=Accelerator(cpu=True), output_dir=out,
                        cache=StageCache(out, [], recipe), dataset=dsd, spec=spec, logger=logging.getLogger("test"))


def test_squeeze_builds_zoo_teachers_from_scratch_and_tv_teachers_pretrained(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(hub_utils, "require_online", no_network)
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(gvbsm_hf.teacher, "create_backbone",
                        _tiny_backbone_factory(calls, gvbsm_hf.teacher.create_backbone))
    out = tmp_path / "out"
    recipe = _parse("--teachers", "convnet32", "tv:resnet18", "--teacher_pretrained", "true", "--teacher_epochs", "1",
                    "--teacher_batch_size", "20", "--output_dir", str(out))
    ctx = _squeeze_context(recipe, out)
    STAGE_REGISTRY["squeeze"].run(ctx)
    assert {p for n, p in calls if n == "convnet32"} == {False}
    assert ("tv:resnet18", True) in calls
    assert [t.recipe["pretrained init"] for t in ctx.teachers] == [False, True]
    assert all((d / "model.safetensors").exists() for d in ctx.teacher_dirs)

    # teacher_epochs: 0: the pretrained teacher is used as it is, nothing is trained
    calls.clear()
    out0 = tmp_path / "out0"
    recipe0 = _parse("--teachers", "tv:resnet18", "--teacher_pretrained", "true", "--teacher_epochs", "0",
                     "--output_dir", str(out0))

    monkeypatch.setattr(gvbsm_hf.squeeze.stage, "train_teacher", no_network)
    ctx0 = _squeeze_context(recipe0, out0)
    STAGE_REGISTRY["squeeze"].run(ctx0)
    assert ("tv:resnet18", True) in calls and len(ctx0.teachers) == 1
