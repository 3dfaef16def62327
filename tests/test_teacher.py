"""TeacherModel: safetensors + config.json + model card round trip, load_teacher errors."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.errors import GVBSMError, OfflineError
from gvbsm_hf.teacher import TeacherModel, load_teacher
from gvbsm_hf.fingerprint import model_fingerprint

SPEC = DatasetSpec(
    name="toy", num_classes=4, image_size=16, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
    class_names=("a", "b", "c", "d"), source="org/toy",
)
RECIPE = {"epochs": 3, "peak lr": 0.05, "global batch size": 64, "augmentation": "random crop (pad 4) + flip",
          "seed": 7}


def _trained_like(backbone="convnet", **kwargs):
    """A teacher whose weights AND BatchNorm buffers differ from a fresh init."""
    teacher = TeacherModel.from_backbone(backbone, SPEC, backbone_kwargs={"width": 8}, recipe=RECIPE, **kwargs)
    with torch.no_grad():
        for name, buf in teacher.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    teacher.metrics = {"val_top1": 0.8125, "epochs": 3, "train_time_s": 1.5}
    return teacher.eval()


def test_round_trip_identical_logits_and_config(tmp_path):
    teacher = _trained_like()
    teacher.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    loaded = load_teacher(tmp_path)
    assert isinstance(loaded, TeacherModel) and not loaded.training
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(teacher(x), loaded(x))
    assert loaded.config == teacher.config
    assert loaded.fingerprint == teacher.fingerprint == model_fingerprint(teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # config.json holds the constructor arguments, JSON-typed
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["backbone"] == "convnet" and cfg["backbone_kwargs"] == {"width": 8}
    assert cfg["mean"] == [0.4, 0.5, 0.6] and cfg["std"] == [0.2, 0.25, 0.3]
    assert cfg["num_classes"] == 4 and cfg["in_chans"] == 3 and cfg["image_size"] == 16
    assert cfg["class_names"] == ["a", "b", "c", "d"] and cfg["dataset"] == "org/toy"
    assert cfg["metrics"]["val_top1"] == 0.8125 and cfg["accuracy"] == 0.8125
    assert TeacherModel(**loaded.init_kwargs()).config == loaded.config


def test_from_pretrained_on_a_device_string(tmp_path):
    teacher = _trained_like("resnet18_cifar")
    teacher.save_pretrained(tmp_path)
    loaded = load_teacher(str(tmp_path), device="cpu")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), teacher(x), rtol=0, atol=0)
    direct = TeacherModel.from_pretrained(tmp_path)
    assert torch.equal(direct(x), teacher(x))


def test_card_parses_and_has_fields(tmp_path):
    teacher = _trained_like()
    teacher.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "gvbsm-hf"
    assert {"dataset-distillation", "gvbsm", "image-classification"} <= set(data["tags"])
    assert data["datasets"] == ["org/toy"]
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == pytest.approx(0.8125)
    assert result["dataset"]["name"] == "org/toy"
    text = card.text
    assert "81.25 %" in text  # measured validation top-1
    for key, value in RECIPE.items():  # training recipe: epochs, lr, batch size, augmentation, seed
        assert f"| {key} | {value} |" in text
    assert "load_teacher(" in text and teacher.fingerprint in text


def test_card_is_rewritten_with_new_metrics(tmp_path):
    teacher = _trained_like()
    teacher.save_pretrained(tmp_path)
    teacher.metrics = {"val_top1": 0.5}
    teacher.save_pretrained(tmp_path)
    assert "50.00 %" in ModelCard.load(tmp_path / "README.md").text
    assert json.loads((tmp_path / "config.json").read_text())["metrics"] == {"val_top1": 0.5}


def test_fingerprint_tracks_weights():
    teacher = _trained_like()
    before = teacher.fingerprint
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1.0
    assert teacher.fingerprint != before


def test_bad_construction_names_the_fix():
    with pytest.raises(GVBSMError, match="one value per channel"):
        TeacherModel("convnet", 10, 3, 32, mean=[0.5], std=[0.5])
    with pytest.raises(GVBSMError, match="class_names"):
        TeacherModel("convnet", 10, 1, 32, mean=[0.5], std=[0.5], class_names=["a"])


def test_check_spec():
    teacher = TeacherModel.from_backbone("convnet", SPEC, backbone_kwargs={"width": 4})
    teacher.check_spec(SPEC)
    other = DatasetSpec("other", 4, 32, 3, SPEC.mean, SPEC.std)
    with pytest.raises(GVBSMError, match="image_size"):
        teacher.check_spec(other)


def test_load_teacher_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GVBSMError, match="save_pretrained"):
        load_teacher(tmp_path)
    with pytest.raises(GVBSMError, match="does not exist"):
        load_teacher(str(tmp_path / "nope" / "deeper"))
    for not_an_id in ("convnet32", "hf-hub:org/teacher"):  # a backbone name is not a saved teacher
        with pytest.raises(GVBSMError, match="not a Hub model id"):
            load_teacher(not_an_id)


def test_load_teacher_offline_hub_id(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OfflineError) as info:
        load_teacher("some-org/some-teacher")
    assert "some-org/some-teacher" in str(info.value) and "local teacher folder" in str(info.value)


def test_card_of_a_teacher_trained_on_a_local_folder_names_no_path(tmp_path):
    data = tmp_path / "my_images"
    data.mkdir()
    spec = DatasetSpec("my_images", 4, 16, 3, SPEC.mean, SPEC.std, source=str(data))
    teacher = TeacherModel.from_backbone("convnet", spec, backbone_kwargs={"width": 4})
    teacher.metrics = {"val_top1": 0.5}
    out = tmp_path / "teacher"
    teacher.save_pretrained(out)
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "**my_images**" in text
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert "datasets" not in card  # only Hub dataset ids go in the metadata
    assert card["model-index"][0]["results"][0]["dataset"]["name"] == "my_images"
    assert 'load_teacher("path/to/teacher")' in text
