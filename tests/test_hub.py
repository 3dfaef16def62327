"""Export (gvbsm_hf.export): export round trips through `datasets`, the dataset card, offline-safe push."""

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import datasets
import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image

from gvbsm_hf import hub_utils
from gvbsm_hf.export import card as export_card
from gvbsm_hf.export import push as export_push
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.errors import DataValidationError, GVBSMError, OfflineError
from gvbsm_hf.export.engine import export_distilled_dataset
from gvbsm_hf.export.loading import load_distilled_dataset, load_distilled_spec, load_stored_soft_labels, to_tensors
from gvbsm_hf.export.push import push_distilled_dataset, push_teacher
from gvbsm_hf.relabel.store import StoredSoftLabels

K = 5
CLASS_NAMES = ("zero", "one", "two", "three", "four")


def make_spec(channels: int = 3, size: int = 8, license: str | None = "MIT") -> DatasetSpec:
    return DatasetSpec(
        name="toy_set", num_classes=K, image_size=size, channels=channels, mean=(0.5,) * channels,
        std=(0.25,) * channels, class_names=CLASS_NAMES, license=license, source="org/toy-source",
    )


def make_inputs(channels: int = 3, n: int = 10, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    images[0].fill_(0)  # extremes survive the round trip
    images[1].fill_(255)
    labels = torch.arange(n) % K
    logits = torch.randn(n, K, generator=g) * 3.0
    return images, labels, logits


def statistics_table(seed: int = 1) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = {"teacher": [], "teacher_fingerprint": [], "layer": [], "statistic": [], "shape": [], "values": []}
    for teacher in ("convnet32", "wrn_16_2"):
        for layer in ("features.0", "features.3"):
            for stat, shape in (("channel_mean", [4]), ("patch_var", [2, 2])):
                rows["teacher"].append(teacher)
                rows["teacher_fingerprint"].append(hashlib.sha256(teacher.encode()).hexdigest()[:16])
                rows["layer"].append(layer)
                rows["statistic"].append(stat)
                rows["shape"].append(shape)
                rows["values"].append(rng.standard_normal(int(np.prod(shape))).astype(np.float32))
    features = datasets.Features({
        "teacher": datasets.Value("string"), "teacher_fingerprint": datasets.Value("string"),
        "layer": datasets.Value("string"), "statistic": datasets.Value("string"),
        "shape": datasets.List(datasets.Value("int32")), "values": datasets.List(datasets.Value("float32")),
    })
    return datasets.Dataset.from_dict(rows, features=features)


METHOD = {"syn_method": "gvbsm", "ipc": 2, "syn_iterations": 40, "syn_lr": 0.1, "syn_alpha": 0.8,
          "teachers": ["convnet32", "wrn_16_2"], "student": "convnet32", "gamma": 0.1}
RESULTS = [
    {"method": "gvbsm", "labels": "soft", "evaluator": "convnet32", "mean": 51.234, "std": 1.517, "n": 3,
     "protocol": "last epoch, mean ± std over seeds"},
    {"method": "random_real", "soft_label": False, "evaluator": "convnet32", "mean": 30.5, "std": 0.25, "n": 3},
]


def decode(ds: datasets.Dataset, channels: int) -> np.ndarray:
    out = []
    for row in ds:
        a = np.asarray(row["image"])
        out.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    return np.stack(out)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def grid_file(tmp_path) -> Path:
    path = tmp_path / "grid_src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("channels", [1, 3])
def test_export_default_and_statistics_round_trip(tmp_path, channels, grid_file):
    spec = make_spec(channels)
    images, labels, logits = make_inputs(channels)
    stats = statistics_table()
    slots = {"slot": [i // K for i in range(10)], "init": ["noise"] * 10}
    folder = export_distilled_dataset(
        tmp_path / "export", images=images, labels=labels, spec=spec, soft_logits=logits, slot_metadata=slots,
        statistics=stats, method=METHOD, results=RESULTS, grid_path=grid_file,
    )
    cache = str(tmp_path / "cache")
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=cache)  # default config
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(CLASS_NAMES)
    assert isinstance(ds.features["image"], datasets.Image)
    np.testing.assert_array_equal(decode(ds, channels), images.numpy())
    assert ds["label"] == labels.tolist()
    back = np.asarray(ds.with_format("numpy")["soft_logits"], dtype=np.float32)
    assert np.array_equal(back, logits.numpy().astype(np.float32))
    assert ds["slot"] == slots["slot"] and ds["init"] == slots["init"]
    # the parquet stores PNG bytes, never pickles
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"

    # helper: tensors back
    t_images, t_labels, t_soft = to_tensors(load_distilled_dataset(folder, cache_dir=cache), load_distilled_spec(folder))
    assert t_images.dtype == torch.uint8 and torch.equal(t_images, images)
    assert torch.equal(t_labels, labels.long()) and torch.equal(t_soft, logits.float())
    assert load_distilled_spec(folder) == spec

    st = datasets.load_dataset(str(folder), "statistics", split="train", cache_dir=cache)
    assert st.column_names == stats.column_names
    for col in ("teacher", "teacher_fingerprint", "layer", "statistic", "shape"):
        assert st[col] == stats[col]
    for a, b in zip(st.with_format("numpy")["values"], stats.with_format("numpy")["values"]):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    assert json.loads((folder / "gvbsm_config.json").read_text()) == METHOD
    assert not (folder / "views").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".export.tmp")]


@pytest.mark.parametrize("as_table", [False, True])
def test_export_views_round_trip_dict_and_stored_soft_labels(tmp_path, as_table):
    spec = make_spec(3)
    images, labels, logits = make_inputs(3, n=6)
    g = torch.Generator().manual_seed(3)
    n, v = 6, 3
    xy = torch.rand(n, v, 2, generator=g) * 4
    boxes = torch.cat([xy, xy + 4], dim=-1)
    flip = torch.rand(n, v, generator=g) > 0.5
    view_logits = torch.randn(n, v, K, generator=g).half()
    stored = StoredSoftLabels(boxes=boxes, flip=flip, num_classes=K, image_size=(8, 8), out_size=8,
                              logits=view_logits, seed=7)
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=spec, soft_logits=logits,
                                      stored_views=stored.to_dataset() if as_table else stored, method=METHOD)
    cache = str(tmp_path / "cache")
    views = datasets.load_dataset(str(folder), "views", split="train", cache_dir=cache)
    assert len(views) == n
    back = load_stored_soft_labels(folder)
    assert torch.equal(back.boxes, boxes) and torch.equal(back.flip, flip)
    assert back.logits.dtype == torch.float16 and torch.equal(back.logits, view_logits)
    assert back.seed == 7 and back.out_size == 8 and back.num_views == v

    # plain dict of lists: same rows come back
    rows = {"views_boxes": boxes.tolist(), "views_flip": flip.tolist(),
            "soft_logits": view_logits.float().tolist()}
    folder2 = export_distilled_dataset(tmp_path / "ex2", images=images, labels=labels, spec=spec, stored_views=rows,
                                       method=METHOD)
    views2 = datasets.load_dataset(str(folder2), "views", split="train", cache_dir=cache)
    assert views2["views_flip"] == rows["views_flip"]
    assert np.array_equal(np.asarray(views2["views_boxes"], np.float32), boxes.numpy())
    assert np.array_equal(np.asarray(views2["soft_logits"], np.float32), view_logits.float().numpy())
    card = DatasetCard.load(folder2 / "README.md")
    assert {c["config_name"] for c in card.data.configs} == {"default", "views"}
    with pytest.raises(GVBSMError, match="stored_views"):
        load_stored_soft_labels(folder2)  # no metadata for a plain dict: the message says how to get it


def test_export_topk_variant(tmp_path):
    spec = make_spec(3)
    images, labels, logits = make_inputs(3)
    k = 2
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=spec, soft_logits=logits,
                                      topk=k, method=METHOD)
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert "soft_logits" not in ds.column_names
    values = np.asarray(ds["topk_values"], np.float32)
    indices = np.asarray(ds["topk_indices"], np.int64)
    order = np.argsort(-logits.numpy(), axis=1)[:, :k]  # reference: the k largest, descending
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(values, np.take_along_axis(logits.numpy(), order, axis=1))
    _, _, dense = to_tensors(ds, spec)
    np.testing.assert_array_equal(np.take_along_axis(dense.numpy(), order, axis=1), values)
    others = np.ones_like(dense.numpy(), dtype=bool)
    np.put_along_axis(others, order, False, axis=1)
    assert (dense.numpy()[others].reshape(len(ds), K - k) < values[:, -1:]).all()


def test_reexport_replaces_old_export_and_refuses_foreign_folder(tmp_path):
    spec = make_spec(3)
    images, labels, logits = make_inputs(3, n=5)
    rows = {"views_boxes": [[[0.0, 0.0, 8.0, 8.0]]] * 5, "views_flip": [[False]] * 5}
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=spec, stored_views=rows,
                                      method=METHOD)
    assert (folder / "views").exists()
    export_distilled_dataset(folder, images=images, labels=labels, spec=spec, method=METHOD)
    assert not (folder / "views").exists()  # no stale config left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GVBSMError, match="empty or new folder"):
        export_distilled_dataset(foreign, images=images, labels=labels, spec=spec, method=METHOD)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------- card


def test_dataset_card(tmp_path, grid_file):
    spec = make_spec(3, license="MIT")
    images, labels, logits = make_inputs(3)
    folder = export_distilled_dataset(
        tmp_path / "ex", images=images, labels=labels, spec=spec, soft_logits=logits, statistics=statistics_table(),
        method=METHOD, results=RESULTS, teacher_repos=["me/toy-convnet32", "me/toy-wrn_16_2"], grid_path=grid_file,
        repo_id="me/toy-gvbsm-ipc2", source_dataset="org/toy-source",
    )
    card = DatasetCard.load(folder / "README.md")
    data = card.data
    assert data.license == "mit"  # carried over from spec.license, as a Hub license id
    assert "dataset-distillation" in data.tags and "gvbsm" in data.tags
    assert data.task_categories == ["image-classification"]
    assert data.source_datasets == ["org/toy-source"]
    assert data.ipc == 2 and data.method == "gvbsm"
    assert data.settings["syn_lr"] == 0.1  # no recipe defaults given: the main settings
    assert data.teachers == ["me/toy-convnet32", "me/toy-wrn_16_2"]
    configs = {c["config_name"]: c for c in data.configs}
    assert set(configs) == {"default", "statistics"}
    for c in configs.values():
        for f in c["data_files"]:
            assert (folder / f["path"]).is_file()
    info_names = {i["config_name"] for i in data.dataset_info}
    assert info_names == {"default", "statistics"}

    body = card.text
    row = RESULTS[0]
    assert f"| gvbsm | convnet32 | soft | {row['mean']:.2f} ± {row['std']:.2f} | 3 |" in body
    assert "last epoch, mean ± std over 3 seeds" in body
    assert "| random_real | convnet32 | hard |" in body
    assert "](grid.png)" in body and (folder / "grid.png").read_bytes() == grid_file.read_bytes()
    assert "Generalized Large-Scale Data Condensation via Various Backbone and Statistical Matching" in body
    assert "Squeeze, Recover and Relabel" in body and "@inproceedings" in body
    assert "gvbsm-hf distill --config gvbsm_config.json --output_dir <folder>" in body
    assert "[me/toy-convnet32](https://huggingface.co/me/toy-convnet32)" in body
    assert "[me/toy-wrn_16_2](https://huggingface.co/me/toy-wrn_16_2)" in body
    assert "not published" not in body
    code = _snippet(body)
    assert 'repo = "me/toy-gvbsm-ipc2"' in code and "GVBSMTrainer" in code
    # the on-the-fly relabel loads exactly the published ids
    assert 'load_teacher(t) for t in ["me/toy-convnet32", "me/toy-wrn_16_2"]' in code


def test_card_cites_the_paper_not_spec(tmp_path):
    images, labels, logits = make_inputs(3, n=5)
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=make_spec(3),
                                      soft_logits=logits, method=METHOD)
    text = (folder / "README.md").read_text()
    assert "SPEC" not in text
    assert "[the paper](https://arxiv.org/abs/2311.17950) Eq. 1, 6, 9, 10" in text
    assert "github.com" not in text


def _local_fragments(*paths: Path) -> list[str]:
    """Absolute and cwd-relative paths of ``paths`` (a bare folder name is not a path), and the
    distinctive parts of the cwd."""
    cwd = Path(os.getcwd())
    out = [os.getcwd(), cwd.name, cwd.parent.name]
    for p in paths:
        out += [str(p.resolve()), *(r for r in (str(p), os.path.relpath(p.resolve(), cwd)) if os.sep in r)]
    return out


def test_card_with_unpublished_teachers_names_no_local_path(tmp_path, monkeypatch):
    """Default relative output_dir, teacher folders on this machine: the card says where to get the
    teachers and never prints a path of this machine (nor `outputs/`)."""
    monkeypatch.chdir(tmp_path)
    teachers = [Path("outputs/run/teachers/convnet32"), Path("outputs/run/teachers/wrn_16_2")]
    for t in teachers:
        t.mkdir(parents=True)
        (t / "config.json").write_text("{}")
    real = tmp_path / "real_images"
    real.mkdir()
    spec = make_spec(3)
    images, labels, logits = make_inputs(3, n=5)
    rows = {"views_boxes": [[[0.0, 0.0, 8.0, 8.0]]] * 5, "views_flip": [[False]] * 5,
            "soft_logits": [[[0.0] * K]] * 5}
    method = dict(METHOD, output_dir="outputs/run", logging_dir="outputs/run/logs/now", dataset_name=str(real),
                  teachers=[str(teachers[0].resolve()), str(teachers[1])])
    out = Path("outputs/run/export/toy")

    # a local folder is not a published teacher: refused, the message names both fixes
    with pytest.raises(GVBSMError) as e:
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=method,
                                 teacher_repos=[str(teachers[0])])
    assert "local path" in str(e.value) and "teacher_repo_prefix" in str(e.value)
    assert "teacher_names=['convnet32'" in str(e.value)
    with pytest.raises(GVBSMError, match="not a Hub model id"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=method,
                                 teacher_repos=["/abs/teachers/convnet32"])
    with pytest.raises(GVBSMError, match="not a plain name"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=method,
                                 teacher_names=[str(teachers[0])])
    assert not out.exists()

    folder = export_distilled_dataset(
        out, images=images, labels=labels, spec=spec, soft_logits=logits, stored_views=rows, method=method,
        teacher_names=[t.name for t in teachers], source_dataset=str(real),
    )
    text = (folder / "README.md").read_text()
    assert "outputs/" not in text and str(tmp_path) not in text
    for fragment in _local_fragments(*teachers, real, folder):
        assert fragment not in text, fragment
    card = DatasetCard.load(folder / "README.md")
    assert card.data.unpublished_teachers == ["convnet32", "wrn_16_2"]
    assert card.data.to_dict().get("teachers") is None  # the metadata lists published ids only
    assert card.data.settings["teachers"] == ["<local: convnet32>", "<local: wrn_16_2>"]
    assert "output_dir" not in card.data.settings and "logging_dir" not in card.data.settings
    body = card.text
    assert "`convnet32`, `wrn_16_2`" in body and "**not published**" in body
    assert "teacher_repo_prefix: <org>/<name>" in body and "--config gvbsm_config.json" in body
    assert "To train a student without any teacher, use the `views` config (stored soft labels" in body
    code = _snippet(body)
    assert f'StoredViews("{export_card.LOCAL_FOLDER_PLACEHOLDER}")' in code
    assert "load_teacher" not in body and "GVBSMTrainer" not in code
    assert "a local dataset (`real_images`)" in body
    # provenance for machines: the ids/names, not the folders
    export_info = json.loads((folder / "gvbsm_export.json").read_text())
    assert export_info["teachers"] == [] and export_info["teacher_names"] == ["convnet32", "wrn_16_2"]

    # the same teachers once published (what `teacher_repo_prefix` does): links, and the snippet loads them
    ids = ["me/toy-convnet32", "me/toy-wrn_16_2"]
    folder = export_distilled_dataset(
        out, images=images, labels=labels, spec=spec, soft_logits=logits, stored_views=rows, method=method,
        teacher_repos=ids, teacher_names=[t.name for t in teachers], source_dataset=str(real),
    )
    text = (folder / "README.md").read_text()
    assert "outputs/" not in text and str(tmp_path) not in text and "not published" not in text
    card = DatasetCard.load(folder / "README.md")
    assert card.data.teachers == ids and "unpublished_teachers" not in card.data.to_dict()
    assert all(f"[{t}](https://huggingface.co/{t})" in card.text for t in ids)
    assert f"load_teacher(t) for t in {json.dumps(ids)}" in card.text


def test_card_without_views_says_hard_labels(tmp_path):
    images, labels, logits = make_inputs(3, n=5)
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=make_spec(3),
                                      soft_logits=logits, method=METHOD)
    body = DatasetCard.load(folder / "README.md").text
    assert "The teachers\nare **not published**" in body and "no `views` config" in body
    assert 'loss_type="ce"' in _snippet(body)


def test_export_refuses_a_local_repo_id(tmp_path):
    images, labels, _ = make_inputs(3, n=5)
    with pytest.raises(GVBSMError, match="not a Hub dataset id"):
        export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=make_spec(3), method=METHOD,
                                 repo_id=str(tmp_path / "ex"))


def test_card_license_free_text_and_override(tmp_path):
    images, labels, _ = make_inputs(3, n=5)
    spec = make_spec(3, license="unknown (ImageNet terms of access)")
    folder = export_distilled_dataset(tmp_path / "a", images=images, labels=labels, spec=spec, method=METHOD)
    data = DatasetCard.load(folder / "README.md").data
    assert data.license == "other" and "imagenet" in data.license_name
    folder = export_distilled_dataset(tmp_path / "b", images=images, labels=labels, spec=spec, method=METHOD,
                                      license="Apache-2.0")
    assert DatasetCard.load(folder / "README.md").data.license == "apache-2.0"


def _snippet(card_text: str) -> str:
    start = card_text.index("## How to train on this")
    block = card_text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_card_training_snippet_runs(tmp_path, monkeypatch):
    """The card's "How to train on this" code trains a student from the exported folder alone: only
    ``StoredViews``, ``datasets`` and torch (stored views, no teacher, no Hub, no gvbsm-hf Trainer)."""
    spec = make_spec(3)
    images, labels, logits = make_inputs(3, n=10)
    g = torch.Generator().manual_seed(5)
    n, v = 10, 2
    xy = torch.rand(n, v, 2, generator=g) * 2
    stored = StoredSoftLabels(boxes=torch.cat([xy, xy + 6], dim=-1), flip=torch.rand(n, v, generator=g) > 0.5,
                              num_classes=K, image_size=(8, 8), out_size=8, logits=torch.randn(n, v, K, generator=g).half())
    method = dict(METHOD, student="convnet", num_train_epochs=3)
    folder = export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=spec, soft_logits=logits,
                                      stored_views=stored, method=method)
    card = DatasetCard.load(folder / "README.md").text
    code = _snippet(card)
    assert "from gvbsm_hf import StoredViews" in code and str(tmp_path) not in code
    imports = {line.split()[1] for line in code.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"torch", "torch.nn.functional", "gvbsm_hf"}  # StoredViews + torch only
    placeholder = f'StoredViews("{export_card.LOCAL_FOLDER_PLACEHOLDER}")'
    assert placeholder in code  # no repo_id: a placeholder, never this machine's path
    assert "Size: images" in card and "stored views" in card
    code = code.replace(placeholder, f'StoredViews("{folder.resolve()}")')
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    namespace: dict = {}
    before = None
    exec(compile(code.replace("for epoch in range(3):", "before = [p.detach().clone() for p in model.parameters()]\n"
                                                         "for epoch in range(3):"), "dataset_card_snippet", "exec"),
         namespace)
    before = namespace["before"]
    assert torch.isfinite(namespace["loss"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, namespace["model"].parameters()))  # it trained
    assert namespace["views"].epoch == 2 and len(namespace["views"]) == 10


# --------------------------------------------------------------------------------------- push


@pytest.fixture
def exported(tmp_path) -> Path:
    images, labels, logits = make_inputs(3, n=5)
    return export_distilled_dataset(tmp_path / "ex", images=images, labels=labels, spec=make_spec(3),
                                    soft_logits=logits, statistics=statistics_table(), method=METHOD)


@pytest.fixture
def teacher_folder(tmp_path) -> Path:
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# teacher\n")
    (folder / "config.json").write_text(json.dumps({"backbone": "convnet32"}))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


class ForbiddenApi:
    def __init__(self, *a, **k):
        raise AssertionError("HfApi must not be built when offline is known up front")


def _online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("kind", ["dataset", "model"])
def test_push_offline_env(exported, teacher_folder, monkeypatch, kind):
    folder = exported if kind == "dataset" else teacher_folder
    push = push_distilled_dataset if kind == "dataset" else push_teacher
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(export_push, "HfApi", ForbiddenApi)
    before = folder_hashes(folder)
    with pytest.raises(OfflineError) as e:
        push(folder, "me/toy")
    msg = str(e.value)
    assert f"hf upload me/toy {folder.resolve()} . --repo-type {kind}" in msg
    assert "intact" in msg and str(folder.resolve()) in msg and "HF_HUB_OFFLINE" in msg
    assert folder_hashes(folder) == before


def test_push_unreachable_endpoint_fails_before_any_request(exported, monkeypatch):
    _online(monkeypatch)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(export_push, "HfApi", ForbiddenApi)
    before = folder_hashes(exported)
    with pytest.raises(OfflineError, match="not reachable"):
        push_distilled_dataset(exported, "me/toy", private=True)
    assert folder_hashes(exported) == before


def _failing_api(where: str, error: Exception):
    class FailingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, *a, **k):
            if where == "create_repo":
                raise error
            return "https://huggingface.co/datasets/me/toy"

        def upload_folder(self, *a, **k):
            raise error

    return FailingApi


@pytest.mark.parametrize(
    "where,error",
    [
        ("create_repo", httpx2.ConnectError("[Errno 111] Connection refused")),
        ("upload_folder", httpx2.ReadTimeout("timed out")),
        ("upload_folder", ConnectionResetError("reset by peer")),
        ("create_repo", OfflineModeIsEnabled("offline mode is enabled")),
    ],
)
@pytest.mark.parametrize("kind", ["dataset", "model"])
def test_push_connection_error_becomes_offline_error(exported, teacher_folder, monkeypatch, where, error, kind):
    folder = exported if kind == "dataset" else teacher_folder
    push = push_distilled_dataset if kind == "dataset" else push_teacher
    _online(monkeypatch)
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda timeout=3.0, url=None: True)
    monkeypatch.setattr(export_push, "HfApi", _failing_api(where, error))
    before = folder_hashes(folder)
    with pytest.raises(OfflineError) as e:
        push(folder, "me/toy", private=True)
    msg = str(e.value)
    assert f"hf upload me/toy {folder.resolve()} . --repo-type {kind} --private" in msg
    assert type(error).__name__ in msg
    assert isinstance(e.value.__cause__, type(error))
    assert folder_hashes(folder) == before


def test_push_real_hfapi_connection_refused(exported, monkeypatch):
    """The real HfApi against a closed local port: its own connection error is recognised."""
    _online(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda timeout=3.0, url=None: True)  # let the request through
    before = folder_hashes(exported)
    with pytest.raises(OfflineError, match="hf upload me/toy .* --repo-type dataset"):
        push_distilled_dataset(exported, "me/toy", token="hf_not_a_real_token")
    assert folder_hashes(exported) == before


def test_push_one_commit_with_card_and_data(exported, monkeypatch):
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **k):
            calls.append(("create_repo", repo_id, k))
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, **k):
            calls.append(("upload_folder", k))

    _online(monkeypatch)
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda timeout=3.0, url=None: True)
    monkeypatch.setattr(export_push, "HfApi", RecordingApi)
    url = push_distilled_dataset(exported, "me/toy", token="tok", commit_message="v1")
    assert url == "https://huggingface.co/datasets/me/toy"
    assert calls[0] == ("init", "tok")
    assert calls[1][0] == "create_repo" and calls[1][2]["exist_ok"] is True and calls[1][2]["repo_type"] == "dataset"
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert len(uploads) == 1  # data files and card in ONE commit
    k = uploads[0][1]
    assert Path(k["folder_path"]) == exported and k["repo_type"] == "dataset" and k["commit_message"] == "v1"
    assert not k.get("path_in_repo") and not k.get("allow_patterns")  # whole folder: README + parquet together


def test_push_refuses_missing_folder(tmp_path):
    with pytest.raises(GVBSMError, match="export it first"):
        push_distilled_dataset(tmp_path / "nope", "me/toy")


# --------------------------------------------------------------------------------- validation


def test_validation_errors(tmp_path):
    spec = make_spec(3)
    images, labels, logits = make_inputs(3)
    out = tmp_path / "ex"
    with pytest.raises(DataValidationError, match="one label per image"):
        export_distilled_dataset(out, images=images, labels=labels[:-1], spec=spec, method=METHOD)
    bad = labels.clone()
    bad[3] = K
    with pytest.raises(DataValidationError, match=rf"label {K} is outside \[0, num_classes={K}\)"):
        export_distilled_dataset(out, images=images, labels=bad, spec=spec, method=METHOD)
    with pytest.raises(DataValidationError, match=rf"soft_logits has {K + 1} columns .*num_classes={K}"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD,
                                 soft_logits=torch.randn(len(labels), K + 1))
    with pytest.raises(DataValidationError, match="uint8"):
        export_distilled_dataset(out, images=images.float() / 255, labels=labels, spec=spec, method=METHOD)
    with pytest.raises(DataValidationError, match="spec.channels=1"):
        export_distilled_dataset(out, images=images, labels=labels, spec=make_spec(1), method=METHOD)
    with pytest.raises(DataValidationError, match="spec.image_size=16"):
        export_distilled_dataset(out, images=images, labels=labels, spec=make_spec(3, size=16), method=METHOD)
    with pytest.raises(DataValidationError, match="NaN"):
        nan = logits.clone()
        nan[0, 0] = float("nan")
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD, soft_logits=nan)
    with pytest.raises(GVBSMError, match="topk needs soft_logits"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD, topk=2)
    with pytest.raises(DataValidationError, match="one per image"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD,
                                 slot_metadata={"slot": [0, 1]})
    with pytest.raises(DataValidationError, match="stored_views has 2 rows for 10 images"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD,
                                 stored_views={"views_flip": [[True], [False]]})
    with pytest.raises(GVBSMError, match="'evaluator' and 'mean'"):
        export_distilled_dataset(out, images=images, labels=labels, spec=spec, method=METHOD, results=[{"std": 1.0}])
    assert not out.exists()  # nothing written by a refused export
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- hub_utils


def test_is_hub_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("me/toy", "zalando-datasets/fashion_mnist", "Org.1/model_v2"):
        assert hub_utils.is_hub_repo_id(name), name
    for name in ("hf-hub:timm/resnet18", "tv:resnet18", "./me/toy", "/me/toy", "~/me/toy", "a/b/c", "me/toy--x",
                 "me toy/x", "convnet32", ""):
        assert not hub_utils.is_hub_repo_id(name), name
    assert hub_utils.is_hub_repo_id("cifar10", require_namespace=False)
    (tmp_path / "outputs" / "teachers").mkdir(parents=True)
    assert not hub_utils.is_hub_repo_id("outputs/teachers")  # valid id syntax, but a local folder here
    assert not hub_utils.is_hub_repo_id(Path("me/toy"))  # a Path is never a repo id


@pytest.mark.parametrize(
    "env,datasets_scope,offline",
    [
        ({"HF_HUB_OFFLINE": "1"}, False, "HF_HUB_OFFLINE"),
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False, None),  # HF_HUB_OFFLINE decides first
        ({"TRANSFORMERS_OFFLINE": "1"}, False, "TRANSFORMERS_OFFLINE"),
        ({"HF_DATASETS_OFFLINE": "1"}, False, None),  # datasets-only switch
        ({"HF_DATASETS_OFFLINE": "1"}, True, "HF_DATASETS_OFFLINE"),
        ({"HF_DATASETS_OFFLINE": "0", "HF_HUB_OFFLINE": "1"}, True, None),  # as datasets.config reads it
        ({}, True, None),
    ],
)
def test_offline_reason_reads_the_environment_now(monkeypatch, env, datasets_scope, offline):
    for var in hub_utils.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    reason = hub_utils.offline_reason(datasets=datasets_scope)
    if offline is None:
        assert reason is None
    else:
        assert offline in reason
    # huggingface_hub's own flag (read at import) also counts
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_utils.is_offline(datasets=datasets_scope)


def test_require_online_fails_fast_naming_the_fix(monkeypatch):
    _online(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(OfflineError) as e:
        hub_utils.require_online("Weights of 'x' are not in the local cache", "pass pretrained=False.")
    assert time.monotonic() - start < 5
    assert str(e.value) == "Weights of 'x' are not in the local cache (127.0.0.1 is not reachable). Fix: pass pretrained=False."
    with socket.socket() as server:  # a listening port is reachable
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub_utils.hub_reachable(url=f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"HF_HUB_OFFLINE is set; if this machine does have network access, unset"):
        hub_utils.require_online("Weights of 'x' are not in the local cache", "pass pretrained=False.")
