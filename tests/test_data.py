"""gvbsm_hf.data: loading (built-ins, folders, Hub offline), validation errors, spec, tensors, batches."""

import gzip
import io
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import FASHION_MNIST_DIR, requires_fashion_mnist
from PIL import Image

from gvbsm_hf import hub_utils
from gvbsm_hf.data import (
    DatasetSpec,
    class_balanced_indices,
    get_dataset_spec,
    image_batches,
    load_image_dataset,
    to_uint8_tensors,
    validate_image_dataset,
)
from gvbsm_hf.errors import DataValidationError, GVBSMError, OfflineError


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _dsd(train_images, train_labels, val_images=None, val_labels=None, names=("a", "b", "c"), label_feature=None):
    """DatasetDict with PNG-encoded images (numpy arrays or raw {'bytes', 'path'} values)."""
    label_feature = label_feature or datasets.ClassLabel(names=list(names))
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})

    def enc(images):
        return [im if isinstance(im, dict) else {"bytes": _png(im), "path": None} for im in images]

    val_images = train_images if val_images is None else val_images
    val_labels = train_labels if val_labels is None else val_labels
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(
            {"image": enc(train_images), "label": list(train_labels)}, features=features
        ),
        "validation": datasets.Dataset.from_dict(
            {"image": enc(val_images), "label": list(val_labels)}, features=features
        ),
    })


def _rgb(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------ built-ins


def test_digits_schema_counts_and_stratified_split():
    dsd = load_image_dataset("digits")
    assert set(dsd.keys()) == {"train", "validation"}
    assert len(dsd["train"]) + len(dsd["validation"]) == 1797
    assert len(dsd["validation"]) == pytest.approx(0.2 * 1797, abs=1)
    for split in dsd.values():
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == [str(i) for i in range(10)]
    img = dsd["train"][0]["image"]
    assert img.size == (16, 16) and img.mode == "L"
    assert np.asarray(img).max() > 200  # 0..16 scaled to 0..255
    tr = np.bincount(dsd["train"]["label"][:], minlength=10)
    va = np.bincount(dsd["validation"]["label"][:], minlength=10)
    assert np.all(np.abs(va / (tr + va) - 0.2) < 0.02)  # stratified
    other = load_image_dataset("digits", seed=1)
    a = to_uint8_tensors(dsd["validation"], get_dataset_spec(dsd, "digits"))[0]
    b = to_uint8_tensors(other["validation"], get_dataset_spec(other, "digits"))[0]
    assert not torch.equal(a, b)  # the split depends on the seed


def test_digits_builtin_mean_std_match_the_data():
    dsd = load_image_dataset("digits")
    spec = get_dataset_spec(dsd, "digits")
    assert (spec.image_size, spec.channels, spec.num_classes) == (16, 1, 10) and spec.license
    x = torch.cat([to_uint8_tensors(dsd[s], spec)[0] for s in ("train", "validation")]).numpy().astype(np.float64) / 255
    assert spec.mean[0] == pytest.approx(x.mean(), abs=1e-3)
    assert spec.std[0] == pytest.approx(x.std(), abs=1e-3)


def test_max_samples_take_class_balanced_subsets():
    dsd = load_image_dataset("digits", max_train_samples=50, max_eval_samples=20, seed=3)
    assert len(dsd["train"]) == 50 and len(dsd["validation"]) == 20
    assert np.bincount(dsd["train"]["label"][:], minlength=10).tolist() == [5] * 10
    assert np.bincount(dsd["validation"]["label"][:], minlength=10).tolist() == [2] * 10


@requires_fashion_mnist
def test_fashion_mnist_from_debian_idx_files():
    dsd = load_image_dataset("fashion_mnist")
    assert (len(dsd["train"]), len(dsd["validation"])) == (60000, 10000)
    names = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert dsd["train"].features["label"].names == names
    spec = get_dataset_spec(dsd, "fashion_mnist")
    assert (spec.image_size, spec.channels, spec.license) == (28, 1, "MIT")
    # pixels and labels equal the raw IDX files (parsed here independently)
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in (0, 4321, 9999):
        row = dsd["validation"][i]
        assert row["image"].mode == "L" and row["image"].size == (28, 28)
        assert np.array_equal(np.asarray(row["image"]), raw[i]) and row["label"] == raw_labels[i]


# ------------------------------------------------------------------------- folders / Hub


def _write_imagefolder(root, splits=("train", "test"), per_class=6, size=10):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("apple", "pear", "plum"):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{k}.png")


def test_local_imagefolder_loads_with_auto_columns(tmp_path):
    _write_imagefolder(tmp_path)
    dsd = load_image_dataset(str(tmp_path))
    assert dsd["train"].column_names == ["image", "label"] and len(dsd["train"]) == 18
    assert len(dsd["validation"]) == 18  # the "test" split
    assert dsd["train"].features["label"].names == ["apple", "pear", "plum"]
    spec = get_dataset_spec(dsd, str(tmp_path))
    assert (spec.image_size, spec.channels, spec.num_classes) == (10, 3, 3)


def test_folder_without_validation_split_holds_out_stratified_ten_percent(tmp_path):
    _write_imagefolder(tmp_path, splits=("train",), per_class=20)
    dsd = load_image_dataset(str(tmp_path), seed=5)
    assert len(dsd["validation"]) == 6 and len(dsd["train"]) == 54
    assert np.bincount(dsd["validation"]["label"][:]).tolist() == [2, 2, 2]


def test_saved_hub_style_dataset_renames_columns_and_casts_int_labels(tmp_path):
    rng = np.random.default_rng(1)
    feats = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.Value("int64"), "extra": datasets.Value("string")}
    )
    rows = {"img": [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(12)],
            "fine_label": [i % 4 for i in range(12)], "extra": ["x"] * 12}
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats),
                                  "test": datasets.Dataset.from_dict(rows, features=feats)})
    saved.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataValidationError) as e:  # no ClassLabel and no label/labels column
        load_image_dataset(str(tmp_path / "saved"))
    assert "label_column" in str(e.value) and "fine_label" in str(e.value)
    dsd = load_image_dataset(str(tmp_path / "saved"), label_column="fine_label")
    assert dsd["train"].column_names == ["image", "label"]
    assert dsd["train"].features["label"].names == ["0", "1", "2", "3"]
    assert dsd["validation"]["label"][:] == rows["fine_label"]


def test_offline_hub_id_raises_offline_error_naming_the_fix():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    with pytest.raises(OfflineError) as e:
        load_image_dataset("gvbsm-test-org/no-such-dataset-3f9a")
    msg = str(e.value)
    assert "gvbsm-test-org/no-such-dataset-3f9a" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg
    with pytest.raises(OfflineError, match="uoft-cs/cifar10"):
        load_image_dataset("cifar10")


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    monkeypatch.setattr(hub_utils, "offline_reason", lambda datasets=False: None)
    monkeypatch.setattr(hub_utils, "hub_reachable", lambda timeout=3.0, url=None: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("should not try the Hub"))
    with pytest.raises(OfflineError, match="save_to_disk"):
        load_image_dataset("gvbsm-test-org/other-missing")


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------ validation


def test_missing_column_lists_columns_and_argument():
    dsd = _dsd(_rgb(3), [0, 1, 2]).rename_column("label", "target")
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    assert "label_column" in str(e.value) and "'target'" in str(e.value)
    dsd = _dsd(_rgb(3), [0, 1, 2]).rename_column("image", "picture")
    with pytest.raises(DataValidationError, match="image_column"):
        validate_image_dataset(dsd)


def test_label_out_of_range_names_the_fix():
    dsd = _dsd(_rgb(4), [0, 1, 2, 0], label_feature=datasets.Value("int64"))
    dsd["validation"] = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(a), "path": None} for a in _rgb(2)], "label": [1, 5]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    dsd = dsd.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))  # datasets does not check range here
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    msg = str(e.value)
    assert "label 5" in msg and "row 1" in msg and "ClassLabel(names=" in msg


def test_negative_label_names_the_fix():
    dsd = _dsd(_rgb(3), [0, 1, 2], _rgb(2), [0, -1])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    assert "negative label -1" in str(e.value) and "validation_split" in str(e.value)


def test_mixed_sizes_name_the_fix_and_image_size_allows_them():
    images = _rgb(2, size=8) + _rgb(1, size=12)
    dsd = _dsd(images, [0, 1, 2])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    assert "different sizes" in str(e.value) and "image_size" in str(e.value) and "resize" in str(e.value).lower()
    validate_image_dataset(dsd, image_size=8)
    spec = get_dataset_spec(dsd, "mixed", image_size=8)
    x, _ = to_uint8_tensors(dsd["train"], spec)
    assert x.shape == (3, 3, 8, 8)


def test_mixed_channels_name_the_fix():
    rng = np.random.default_rng(0)
    images = _rgb(2) + [rng.integers(0, 256, (8, 8), dtype=np.uint8)]
    dsd = _dsd(images, [0, 1, 2])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    msg = str(e.value)
    assert "channel" in msg and "'L'" in msg and "convert" in msg and "`channels: 3`" in msg and "--channels 3" in msg
    validate_image_dataset(dsd, channels=3)


def test_corrupt_bytes_name_the_row():
    images = _rgb(3)
    images[2] = {"bytes": b"\x89PNG\r\n\x1a\n this is not a png", "path": None}
    dsd = _dsd(images, [0, 1, 2])
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    assert "row 2" in str(e.value) and "'train'" in str(e.value) and "remove the row" in str(e.value)


def test_empty_train_class_names_the_class():
    dsd = _dsd(_rgb(4), [0, 2, 0, 2], names=("cat", "dog", "emu"))
    with pytest.raises(DataValidationError) as e:
        validate_image_dataset(dsd)
    assert "'dog'" in str(e.value) and "no training images" in str(e.value) and "max_train_samples" in str(e.value)


def test_validation_of_load_image_dataset_runs_before_returning(tmp_path):
    _write_imagefolder(tmp_path, per_class=2)
    bad = tmp_path / "train" / "pear" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataValidationError, match="cannot be decoded"):
        load_image_dataset(str(tmp_path))


# ------------------------------------------------------------------------------ spec & tensors


def test_spec_of_unknown_dataset_matches_float64_numpy():
    rng = np.random.default_rng(4)
    images = [(rng.beta(2, 5, (9, 9, 3)) * 255).astype(np.uint8) for _ in range(40)]
    labels = [i % 3 for i in range(40)]
    dsd = _dsd(images, labels)
    spec = get_dataset_spec(dsd, "my-data")
    stack = np.stack(images).astype(np.float64) / 255.0
    np.testing.assert_allclose(spec.mean, stack.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(spec.std, stack.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    assert (spec.image_size, spec.channels, spec.num_classes, spec.class_names) == (9, 3, 3, ("a", "b", "c"))
    gray = _dsd([a[..., 0] for a in images], labels)
    gspec = get_dataset_spec(gray, "gray")
    assert gspec.channels == 1
    assert gspec.mean[0] == pytest.approx(stack[..., 0].mean(), abs=1e-12)


def test_to_uint8_tensors_round_trip_equals_pil_pixels():
    images = _rgb(5, size=10, seed=2)
    dsd = _dsd(images, [0, 1, 2, 0, 1])
    spec = DatasetSpec("t", 3, 10, 3, (0.5,) * 3, (0.5,) * 3)
    x, y = to_uint8_tensors(dsd["train"], spec)
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 10, 10) and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 2, 0, 1]
    for i, a in enumerate(images):
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), np.asarray(dsd["train"][i]["image"]))
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), a)
    # converted to one channel and resized like PIL does it
    gspec = DatasetSpec("t", 3, 6, 1, (0.5,), (0.5,))
    g, _ = to_uint8_tensors(dsd["train"], gspec)
    ref = np.asarray(Image.fromarray(images[3]).convert("L").resize((6, 6), Image.BILINEAR))
    assert g.shape == (5, 1, 6, 6) and np.array_equal(g[3, 0].numpy(), ref)
    # a selected (indexed) split keeps its order
    sub = dsd["train"].select([4, 1])
    xs, ys = to_uint8_tensors(sub, spec)
    assert torch.equal(xs, x[[4, 1]]) and ys.tolist() == [1, 1]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_image_batches_one_vs_two_processes_cover_the_same_batches(streaming, drop_last):
    n, bs = 23, 4
    images = _rgb(n, size=5, seed=3)
    dsd = _dsd(images, [i % 3 for i in range(n)])
    split = dsd["train"].to_iterable_dataset() if streaming else dsd["train"]
    spec = DatasetSpec("t", 3, 5, 3, (0.5,) * 3, (0.5,) * 3)
    kw = dict(shuffle=True, seed=11, drop_last=drop_last)
    single = list(image_batches(split, spec, bs, **kw))
    p0 = list(image_batches(split, spec, bs, process_index=0, num_processes=2, **kw))
    p1 = list(image_batches(split, spec, bs, process_index=1, num_processes=2, **kw))
    assert len(p0) + len(p1) == len(single) == (n // bs if drop_last else -(-n // bs))
    for got, want in zip(p0 + p1, single[0::2] + single[1::2]):  # global batch i -> process i % 2
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    allx = torch.cat([b[0] for b in single])
    full, _ = to_uint8_tensors(dsd["train"], spec)
    if not drop_last:  # every row exactly once
        assert sorted(map(bytes, allx.flatten(1).numpy())) == sorted(map(bytes, full.flatten(1).numpy()))
    if not streaming:
        unshuffled = torch.cat([b[0] for b in image_batches(split, spec, bs)])
        m = len(allx)
        assert torch.equal(unshuffled, full) and not torch.equal(allx, full[:m])  # shuffle=True reorders


@pytest.mark.parametrize("process_index", [0, 1])
def test_image_batches_with_worker_processes_equal_in_process_decoding(process_index):
    n, bs = 27, 4
    dsd = _dsd(_rgb(n, size=6, seed=8), [i % 3 for i in range(n)])
    spec = DatasetSpec("t", 3, 6, 3, (0.5,) * 3, (0.5,) * 3)
    kw = dict(shuffle=True, seed=5, process_index=process_index, num_processes=2)
    here = list(image_batches(dsd["train"], spec, bs, **kw))
    workers = list(image_batches(dsd["train"], spec, bs, num_workers=2, **kw))
    assert len(here) == len(workers) == len(range(process_index, -(-n // bs), 2))
    for (xa, ya), (xb, yb) in zip(here, workers):  # same batches, same order
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(GVBSMError, match="num_workers"):
        next(image_batches(dsd["train"], spec, bs, num_workers=-1))


def test_streaming_digits_give_the_same_tensors():
    plain = load_image_dataset("digits")
    streamed = load_image_dataset("digits", streaming=True)
    assert isinstance(streamed, datasets.IterableDatasetDict)
    spec = get_dataset_spec(plain, "digits")
    a, la = to_uint8_tensors(plain["validation"], spec)
    b, lb = to_uint8_tensors(streamed["validation"], spec)
    assert torch.equal(a, b) and torch.equal(la, lb)


# ------------------------------------------------------------------------------ class balance


def test_class_balanced_indices_counts():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 20 + [5] * 9)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    idx = class_balanced_indices(labels.tolist(), n_per_class=5, seed=1)
    assert idx == sorted(set(idx))
    assert {c: int((labels[idx] == c).sum()) for c in (0, 1, 2, 5)} == {0: 5, 1: 3, 2: 5, 5: 5}
    idx = class_balanced_indices(labels, total=30, seed=1)
    counts = {c: int((labels[idx] == c).sum()) for c in (0, 1, 2, 5)}
    assert len(idx) == 30 and counts[1] == 3  # the small class gives all it has
    assert sorted([counts[0], counts[2], counts[5]]) == [9, 9, 9]
    idx7 = class_balanced_indices(labels, total=7, seed=1)
    c7 = sorted(int((labels[idx7] == c).sum()) for c in (0, 1, 2, 5))
    assert len(idx7) == 7 and c7 == [1, 2, 2, 2]
    assert class_balanced_indices(labels, total=30, seed=1) == idx
    assert class_balanced_indices(labels, total=30, seed=2) != idx
    assert class_balanced_indices(labels) == list(range(len(labels)))
    assert len(class_balanced_indices(labels, total=10_000)) == len(labels)
    ds = datasets.Dataset.from_dict({"label": labels.tolist()})
    assert class_balanced_indices(ds["label"], total=30, seed=1) == idx  # a datasets Column works too
    with pytest.raises(GVBSMError, match="not both"):
        class_balanced_indices(labels, n_per_class=2, total=3)
