"""The ImageNet-1k path (issue 16): per-dataset preprocessing, bounded memory, the CPU dress rehearsal.

- the evaluation view at ImageNet scale is Resize(round(size / 0.875)) of the shorter side +
  CenterCrop(size) of the ORIGINAL image (checked against a reference written here with PIL),
  the train view a RandomResizedCrop of the original image (seeded, any worker / process layout
  gives the same pixels), small sets keep the bilinear resize;
- no stage holds more than a bounded number of decoded images: a validation split whose decode
  raises as soon as more than a few batches are decoded and not yet consumed still evaluates,
  with the same numbers as the decoded tensor; ``StageContext.real`` at ImageNet scale and real
  initialisation decode only the rows they index;
- the rehearsal: ``recipes/imagenet1k/gvbsm_ipc10.yaml`` itself, shrunk by command-line overrides
  only, on a generated ImageNet-shaped folder (mixed sizes, a grayscale and a CMYK JPEG, 20
  classes), end to end to the exported dataset folder (``benchmarks/imagenet_rehearsal.py`` runs
  the same, stage by stage, measuring time and memory).
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import gvbsm_hf.data.decoding as decoding
from gvbsm_hf.data import DatasetSpec, DecodedImages, image_batches, preprocessing_for, to_uint8_tensors

REPO = Path(__file__).resolve().parents[1]
IMAGENET_RECIPE = REPO / "recipes" / "imagenet1k" / "gvbsm_ipc10.yaml"


def _spec(size: int = 224, channels: int = 3, k: int = 2, **kw) -> DatasetSpec:
    return DatasetSpec(name="t", num_classes=k, image_size=size, channels=channels, mean=(0.5,) * channels,
                       std=(0.25,) * channels, class_names=tuple(str(i) for i in range(k)), **kw)


def _pattern(w: int, h: int, seed: int = 0) -> Image.Image:
    """A non-square RGB image whose every region differs (gradients + noise): crops are identifiable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 7 + yy * 3) % 256], -1)
    a = np.clip(a + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _png(img: Image.Image) -> dict:
    """Lossless bytes of ``img`` (PNG; TIFF for CMYK, which PNG cannot hold)."""
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode == "CMYK" else "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _split(images: list[Image.Image], labels: list[int], k: int = 2) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(k)])})
    return datasets.Dataset.from_dict({"image": [_png(im) for im in images], "label": labels}, features=features)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------- 1. preprocessing per dataset


def test_preprocessing_is_declared_by_the_spec():
    small, large = preprocessing_for(32), preprocessing_for(224)
    assert (small.train_view, small.eval_view, small.stream_splits) == ("pad_crop", "resize", False)
    assert (large.train_view, large.eval_view, large.stream_splits) == ("random_resized_crop", "resize_center_crop", True)
    spec = _spec(224)
    assert spec.eval_view == "resize_center_crop" and spec.eval_resize_size == 256 and spec.stream_splits
    assert _spec(64).eval_view == "resize" and not _spec(64).stream_splits  # Tiny-ImageNet: as before
    overridden = _spec(224, eval_view="resize", stream_splits=False)  # the spec may say otherwise
    assert overridden.eval_view == "resize" and not overridden.stream_splits
    # saved specs (data_spec.json, exported folders) round-trip; older ones without the fields get the rule
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k not in ("train_view", "eval_view", "eval_crop_ratio", "stream_splits")}
    assert DatasetSpec.from_dict(old) == spec


@pytest.mark.parametrize("size", [(300, 200), (180, 400)])  # landscape and portrait (W, H)
def test_validation_preprocessing_is_resize_then_center_crop(size):
    w, h = size
    img = _pattern(w, h)
    # reference, written from the definition of Resize(256) + CenterCrop(224) (torchvision's
    # ImageNet evaluation transform): the shorter side to 256 (bilinear), the longer one
    # int(256 * long / short); then the central 224 x 224, offsets rounded
    short, long_ = min(w, h), max(w, h)
    new = (256, int(256 * long_ / short)) if w <= h else (int(256 * long_ / short), 256)  # (W, H)
    left, top = int(round((new[0] - 224) / 2.0)), int(round((new[1] - 224) / 2.0))
    expected = np.asarray(img.resize(new, Image.BILINEAR).crop((left, top, left + 224, top + 224)))
    spec = _spec(224)
    split = _split([img, img.convert("L"), img.convert("CMYK")], [0, 1, 0])
    x, y = to_uint8_tensors(split, spec)
    assert x.shape == (3, 3, 224, 224) and y.tolist() == [0, 1, 0]
    assert np.array_equal(_hwc(x[0]), expected)
    # grey and CMYK files come out RGB, through the same view
    grey = img.convert("L").convert("RGB").resize(new, Image.BILINEAR).crop((left, top, left + 224, top + 224))
    assert np.array_equal(_hwc(x[1]), np.asarray(grey))
    cmyk = img.convert("CMYK").convert("RGB").resize(new, Image.BILINEAR).crop((left, top, left + 224, top + 224))
    assert np.array_equal(_hwc(x[2]), np.asarray(cmyk))
    # the same through the split decoded on access, and not the squashed whole image of before
    lazy = DecodedImages(split, spec)
    assert torch.equal(lazy[0], x[0]) and torch.equal(lazy[[2, 0]], x[[2, 0]]) and torch.equal(lazy[1:], x[1:])
    squashed = np.asarray(img.resize((224, 224), Image.BILINEAR))
    assert not np.array_equal(_hwc(x[0]), squashed)


def test_small_sets_and_images_at_size_are_unchanged():
    img = _pattern(40, 30)
    x, _ = to_uint8_tensors(_split([img], [0]), _spec(32))
    assert np.array_equal(_hwc(x[0]), np.asarray(img.resize((32, 32), Image.BILINEAR)))  # the bilinear resize of before
    at_size = _pattern(224, 224, seed=1)  # a distilled / pre-cropped image is taken as is
    x, _ = to_uint8_tensors(_split([at_size], [0]), _spec(224))
    assert np.array_equal(_hwc(x[0]), np.asarray(at_size))


def test_train_view_is_a_random_resized_crop_of_the_original_image():
    img = _pattern(300, 200)  # aspect 1.5 > 4/3
    spec = _spec(224)
    # scale (1, 1) of a 3:2 image admits no box with ratio in [3/4, 4/3]: torchvision's fallback, the
    # central full-height crop of ratio 4/3 (of the ORIGINAL pixels), resized to 224 (bilinear)
    cw = int(round(200 * 4 / 3))
    box = ((300 - cw) // 2, 0, (300 - cw) // 2 + cw, 200)
    expected = np.asarray(img.crop(box).resize((224, 224), Image.BILINEAR))
    split = _split([img] * 8, [0, 1] * 4)
    (x, y), = list(image_batches(split, spec, 8, view="train", crop_scale=(1.0, 1.0)))
    flips = 0
    for im in x:
        got = _hwc(im)
        flipped = np.array_equal(got, expected[:, ::-1])
        assert np.array_equal(got, expected) or flipped
        flips += flipped
    assert 0 < flips < 8  # a random horizontal flip per image
    # random boxes at the default scale: seeded per global batch, the same for any worker / process layout
    split = _split([_pattern(260 + 10 * i, 190, seed=i) for i in range(12)], [0, 1] * 6)
    one = torch.cat([b for b, _ in image_batches(split, spec, 4, view="train", seed=3)])
    workers = torch.cat([b for b, _ in image_batches(split, spec, 4, view="train", seed=3, num_workers=2)])
    p0 = [b for b, _ in image_batches(split, spec, 4, view="train", seed=3, process_index=0, num_processes=2)]
    p1 = [b for b, _ in image_batches(split, spec, 4, view="train", seed=3, process_index=1, num_processes=2)]
    assert torch.equal(one, workers) and torch.equal(one, torch.cat([p0[0], p1[0], p0[1]]))
    assert not torch.equal(one, torch.cat([b for b, _ in image_batches(split, spec, 4, view="train", seed=4)]))
    evaluated, _ = to_uint8_tensors(split, spec)
    assert not torch.equal(one, evaluated)
    # below 128 px the train view is the evaluation decode (pad-crop is done on the device)
    small = _spec(32)
    assert torch.equal(torch.cat([b for b, _ in image_batches(split, small, 4, view="train")]),
                       to_uint8_tensors(split, small)[0])


# ---------------------------------------------------------------------- 2. bounded memory


class _DecodeBudget:
    """Counts decoded images and raises once more than ``limit`` are decoded but not yet consumed."""

    def __init__(self, limit: int) -> None:
        self.limit, self.decoded, self.consumed, self.peak = limit, 0, 0, 0

    def decode(self, original):
        def counted(*a, **k):
            self.decoded += 1
            held = self.decoded - self.consumed
            self.peak = max(self.peak, held)
            if held > self.limit:
                raise RuntimeError(f"{held} decoded images held at once (limit {self.limit})")
            return original(*a, **k)
        return counted


def _digits_split(n: int) -> tuple[datasets.Dataset, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    ims = [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L") for i in range(n)]
    labels = [int(t) for t in d.target[:n]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [_png(im) for im in ims], "label": labels}, features=features), \
        torch.tensor(labels)


def test_validation_streams_with_a_bounded_number_of_decoded_images(tmp_path, monkeypatch):
    from gvbsm_hf.evaluate.config import GVBSMTrainingArguments
    from gvbsm_hf.evaluate.runs import evaluate_students
    from gvbsm_hf.evaluate.trainer import GVBSMTrainer

    n_val, bs = 96, 8
    split, _ = _digits_split(n_val)
    spec = DatasetSpec(name="digits-stream", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,),
                       stream_splits=True)
    dense = to_uint8_tensors(split, spec)
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (30, 1, 16, 16), generator=g, dtype=torch.uint8)
    train_y = torch.arange(30) % 10
    kw = dict(students=["convnet"], backbone_kwargs={"width": 8, "depth": 2}, seeds=[0])

    def run(validation, out):
        args = GVBSMTrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=16, per_device_eval_batch_size=bs,
            learning_rate=5e-3, num_train_epochs=1, optim="adamw_torch", lr_scheduler_type="constant",
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            use_cpu=True, loss_type="ce", eval_seeds=[0])
        return evaluate_students(train_x, train_y, validation, spec, args, **kw)["per_run"][0]

    want = run(dense, "dense")
    budget = _DecodeBudget(limit=3 * bs)  # the batch being evaluated, the one prefetched, slack
    monkeypatch.setattr(decoding, "_view_array", budget.decode(decoding._view_array))
    original_step = GVBSMTrainer.prediction_step

    def consuming_step(self, model, inputs, *a, **k):
        budget.consumed += int(inputs["labels"].shape[0])
        return original_step(self, model, inputs, *a, **k)

    monkeypatch.setattr(GVBSMTrainer, "prediction_step", consuming_step)
    with pytest.raises(RuntimeError, match="decoded images held at once"):
        to_uint8_tensors(split, spec)  # decoding the split whole breaks the budget ...
    budget.decoded = budget.consumed = budget.peak = 0
    lazy = DecodedImages(split, spec)
    got = run((lazy, lazy.labels), "streamed")  # ... streaming it does not
    assert budget.decoded == n_val and budget.consumed == n_val and budget.peak <= 3 * bs
    assert got["top1"] == want["top1"] and got["eval_loss"] == want["eval_loss"]  # same numbers, bitwise


def test_stage_context_and_real_init_decode_only_the_rows_they_index(monkeypatch):
    from gvbsm_hf.stage import StageContext
    from gvbsm_hf.methods.init import init_from_real
    from gvbsm_hf.recover.jobs import plan_jobs

    split, labels = _digits_split(200)
    spec = DatasetSpec(name="digits-stream", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,),
                       stream_splits=True)
    dense = to_uint8_tensors(split, spec)
    budget = _DecodeBudget(limit=10**9)
    monkeypatch.setattr(decoding, "_view_array", budget.decode(decoding._view_array))

    class Recipe:  # StageContext reads recipe.data.dataloader_workers
        class data:
            dataloader_workers = 0

    ctx = StageContext(recipe=Recipe, accelerator=None, output_dir=Path("."), cache=None,
                       dataset=datasets.DatasetDict({"train": split}), spec=spec, logger=None)
    images, y = ctx.real("train")
    assert isinstance(images, DecodedImages) and budget.decoded == 0  # nothing decoded yet
    assert images.shape == dense[0].shape and images.dtype == torch.uint8 and torch.equal(y, labels)
    assert ctx.real("train")[0] is images
    job = plan_jobs(10, 2, 5, 2)[1]  # 5 classes x 2 slots
    got = init_from_real(job, (images, y), spec, seed=7)
    assert budget.decoded == len(job) == 10  # the job's rows only
    assert torch.equal(got, init_from_real(job, dense, spec, seed=7))  # the same images as from the tensor
    # long requests go through DataLoader workers, with the same pixels
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:150]
    workers = DecodedImages(split, spec, num_workers=2, batch_size=32)
    assert torch.equal(workers[idx], dense[0][idx])
    assert torch.equal(torch.cat(list(workers.batches(64))), dense[0])
    # a small spec still decodes whole splits (fastest), as before
    small = StageContext(recipe=Recipe, accelerator=None, output_dir=Path("."), cache=None,
                         dataset=datasets.DatasetDict({"train": split}), spec=_spec(16, 1, 10), logger=None)
    assert isinstance(small.real("train")[0], torch.Tensor)


# ---------------------------------------------------------------------- 3. the dress rehearsal


def _rehearsal_module():
    spec = importlib.util.spec_from_file_location("imagenet_rehearsal", REPO / "benchmarks" / "imagenet_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_imagenet_recipe_dress_rehearsal(tmp_path, monkeypatch):
    """recipes/imagenet1k/gvbsm_ipc10.yaml end to end on a generated ImageNet-shaped folder (2-4
    minutes on 2 CPU cores): 224 px, the four torchvision teachers, patch 16, logit normalisation,
    tv:resnet18 student; only overrides that shrink it. No stage decodes a whole split."""
    from gvbsm_hf.pipeline import STAGES, parse_recipe, run_pipeline

    reh = _rehearsal_module()
    folder = reh.make_imagenet_folder(tmp_path / "imagenet", classes=10, train_per_class=4, val_per_class=3)
    assert folder["classes"] >= 10 and {"L", "CMYK", "RGB"} <= set(folder["modes"]) and len(folder["sizes"]) > 50
    assert len({round(w / h, 1) for w, h in folder["sizes"]}) > 5  # many aspect ratios, both orientations
    ipc = int(reh.SHRINK[reh.SHRINK.index("--ipc") + 1])

    whole = []  # every split decoded whole, by size: only the IPC-per-class selection may be
    original = decoding.to_uint8_tensors

    def recorded(split, spec, *a, **k):
        whole.append(len(split))
        return original(split, spec, *a, **k)

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("gvbsm_hf") and m is not None]:
        if getattr(module, "to_uint8_tensors", None) is original:  # every module that imported it
            monkeypatch.setattr(module, "to_uint8_tensors", recorded)

    # the recover health check's real reference at ImageNet-1k's size: diagnostic_real_per_class(1000) = 2 per
    # class (here 50 per class would be every train image: the whole split)
    from gvbsm_hf.recover import health, stage as recover_stage

    assert health.diagnostic_real_per_class(1000) == 2
    monkeypatch.setattr(recover_stage, "diagnostic_real_per_class", lambda num_classes: 2)
    out = tmp_path / "run"
    argv = reh.rehearsal_argv(folder["root"], out)
    assert argv[:2] == ["--config", str(IMAGENET_RECIPE)]
    summary = run_pipeline(parse_recipe(argv))

    stages = json.loads((out / "stages.json").read_text())
    assert all(stages[s]["done"] for s in STAGES)
    n_train = int(reh.SHRINK[reh.SHRINK.index("--max_train_samples") + 1])
    assert whole and max(whole) <= ipc * folder["classes"] < min(n_train, 3 * folder["classes"])
    # ^ the random real subset (IPC per class) only: never the train or validation split
    spec = json.loads((out / "data_spec.json").read_text())
    assert (spec["image_size"], spec["channels"], spec["num_classes"]) == (224, 3, folder["classes"])
    assert spec["eval_view"] == "resize_center_crop" and spec["stream_splits"] is True
    # the recipe's own settings, not overridden
    recipe = yaml.safe_load(IMAGENET_RECIPE.read_text())
    used = json.loads((out / "recipe.json").read_text())
    for key in ("teachers", "stats_patch_size", "relabel_logit_norm", "student", "syn_method", "syn_protocol",
                "method_args", "loss_type", "image_size", "syn_mixed_precision", "syn_channels_last"):
        assert used[key] == recipe[key], key
    assert used["method_args"]["gvbsm"]["syn_backbone_choice"] == "round_robin"
    assert recipe["teachers"] == ["tv:resnet18", "tv:mobilenet_v2", "tv:efficientnet_b0", "tv:shufflenet_v2_x0_5"]
    assert recipe["stats_patch_size"] == 16 and recipe["relabel_logit_norm"] and recipe["student"] == "tv:resnet18"
    for name in ("tv-resnet18", "tv-mobilenet_v2", "tv-efficientnet_b0", "tv-shufflenet_v2_x0_5"):
        assert (out / "teachers" / name / "model.safetensors").is_file()
        assert (out / "statistics" / f"{name}.safetensors").is_file()
    used_teachers, logged = set(), []
    for line in (out / "recover" / "gvbsm" / "jobs").glob("*.log.jsonl"):
        logged += list(map(json.loads, line.read_text().splitlines()))
    for row in logged:
        used_teachers |= set(row["teachers_used"])
    assert used_teachers == {0, 1, 2, 3}  # round robin over the four teachers
    assert all(row["ce"] > 0 and row["bn"] > 0 and row["conv"] > 0 for row in logged)  # the full G-VBSM loss
    assert any(row["dd"] > 0 for row in logged)  # DD (Eq. 5): IPC 2
    rows = summary["results"]
    assert {(r["method"], r["labels"], r["evaluator"]) for r in rows} == {
        ("gvbsm", "soft", "tv:resnet18"), ("gvbsm", "stored_views", "tv:resnet18"), ("random_real", "soft", "tv:resnet18")}
    exported = datasets.load_dataset(str(summary["dataset_folder"]))["train"]
    assert exported.num_rows == ipc * folder["classes"]
    assert all(im.size == (224, 224) and im.mode == "RGB" for im in exported["image"])
    assert (Path(summary["dataset_folder"]) / "README.md").is_file()
