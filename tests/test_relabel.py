"""Relabel (docs/method.md Eq. 8): teacher ensemble and stored soft labels."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from gvbsm_hf.augment import apply_crop_flip
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.ensemble import TeacherEnsemble
from gvbsm_hf.errors import DataValidationError, GVBSMError
from gvbsm_hf.relabel.config import RelabelArguments
from gvbsm_hf.relabel.engine import relabel_stored
from gvbsm_hf.relabel.store import LEGACY_FILES, STORED_LABELS_FILE, StoredSoftLabels
from gvbsm_hf.relabel.views import ViewSampling, sample_image_views, sample_view_cutmix
from gvbsm_hf.utils import derive_seed

SPEC = DatasetSpec(name="digits-test", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,))


def digits_uint8(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits, 8 -> 16 px, uint8 (N, 1, 16, 16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.long)
    return (x[:n], y[:n]) if n else (x, y)


def tiny_teacher(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * width, 10),
    ).eval()


def run_relabel(images, ensemble, *, num_views, out_size, seed=0, topk=None, clean_view=False, cutmix_prob=0.0, **kw):
    """relabel_stored with its config objects built from the loose options of these tests."""
    args = RelabelArguments(relabel_num_views=num_views, relabel_seed=seed, relabel_topk=topk)
    sampling = ViewSampling(out_size, clean_view=clean_view, cutmix_prob=cutmix_prob)
    return relabel_stored(images, ensemble, args, sampling, **kw)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x, _ = digits_uint8(24)
    return SPEC.normalize(x)


@pytest.fixture(scope="module")
def ensemble() -> TeacherEnsemble:
    return TeacherEnsemble([tiny_teacher(1), tiny_teacher(2, width=12)])


# ---- ensemble -----------------------------------------------------------------------------


@pytest.mark.parametrize("logit_norm", [False, True])
def test_ensemble_is_eq8_on_the_same_batch(logit_norm: bool) -> None:
    teachers = [tiny_teacher(1), tiny_teacher(2, width=12), tiny_teacher(3, width=4)]
    for t in teachers:  # BN with non-trivial running stats so eval/train modes differ
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ens = TeacherEnsemble(teachers, logit_norm=logit_norm)
    ens.train()  # must stay in eval mode
    assert all(not m.training for m in ens.modules())
    assert all(not p.requires_grad for p in ens.parameters())

    x = torch.randn(6, 1, 16, 16)
    z = ens(x)
    assert z.dtype == torch.float32 and not z.requires_grad

    # float64 reference of Eq. 8, written here from the equation
    with torch.no_grad():
        logits = [t.double()(x.double()) for t in [_copy_double(s) for s in teachers]]
    if logit_norm:
        norms = torch.stack([f.norm() for f in logits])
        ref = sum(norms.mean() / n * f for n, f in zip(norms, logits)) / len(logits)
    else:
        ref = sum(logits) / len(logits)
    torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-5)

    tau = 3.0
    torch.testing.assert_close(ens.soft_labels(x, tau).double(), torch.softmax(ref / tau, -1), rtol=1e-5, atol=1e-6)


def _copy_double(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).double().eval()


def test_ensemble_output_usable_as_loss_target(ensemble: TeacherEnsemble) -> None:
    student = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    x = torch.randn(4, 1, 16, 16)
    loss = ((student(x) - ensemble(x)) ** 2).mean()
    loss.backward()
    assert student[1].weight.grad is not None
    assert all(p.grad is None for p in ensemble.parameters())


def test_ensemble_rejects_empty_and_mismatched_teachers() -> None:
    with pytest.raises(GVBSMError, match="at least one teacher"):
        TeacherEnsemble([])
    a, b = tiny_teacher(1), tiny_teacher(2)
    a.num_classes, b.num_classes = 10, 100
    with pytest.raises(GVBSMError, match="same dataset"):
        TeacherEnsemble([a, b])


# ---- stored views ------------------------------------------------------------------------


def test_view_params_are_per_image_and_independent_of_batching(images, ensemble) -> None:
    a = run_relabel(images, ensemble, num_views=3, out_size=16, seed=5, batch_size=4, show_progress=False)
    b = run_relabel(images, ensemble, num_views=3, out_size=16, seed=5, batch_size=7, show_progress=False)
    sub = run_relabel(images[:9], ensemble, num_views=3, out_size=16, seed=5, batch_size=100, show_progress=False)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip)
    assert torch.equal(a.boxes[:9], sub.boxes) and torch.equal(a.flip[:9], sub.flip)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(a.logits[:9].float(), sub.logits.float(), atol=2e-3, rtol=2e-3)
    # the views are those of the per-image generator (seed, i), and they differ between images/seeds
    p7 = sample_image_views(7, 3, 16, 16, seed=5)
    assert torch.equal(a.boxes[7], p7.boxes) and torch.equal(a.flip[7], p7.flip)
    assert not torch.equal(a.boxes[0], a.boxes[1])
    c = run_relabel(images[:4], ensemble, num_views=3, out_size=16, seed=6, show_progress=False)
    assert not torch.equal(a.boxes[:4], c.boxes)
    assert a.logits.dtype == torch.float16 and a.logits.shape == (24, 3, 10)
    assert derive_seed(0, 1) != derive_seed(1, 0)


def test_stored_logits_are_the_ensemble_of_each_view(images, ensemble) -> None:
    st = run_relabel(images, ensemble, num_views=4, out_size=12, seed=1, batch_size=5, show_progress=False)
    assert st.out_size == 12 and st.image_size == (16, 16)
    for i in (0, 3, 17):
        for v in range(4):
            x = apply_crop_flip(images[i : i + 1], st.view_params(v, torch.tensor([i])), 12)
            assert x.shape == (1, 1, 12, 12)
            z = ensemble(x)[0]
            torch.testing.assert_close(st.logits[i, v].float(), z.half().float(), atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(st.dense_logits(v, torch.tensor([i]))[0], st.logits[i, v].float())


def test_clean_view_is_identity_and_keeps_other_views(images, ensemble) -> None:
    plain = run_relabel(images, ensemble, num_views=3, out_size=16, seed=2, show_progress=False)
    clean = run_relabel(images, ensemble, num_views=3, out_size=16, seed=2, clean_view=True, show_progress=False)
    assert torch.equal(plain.boxes[:, 1:], clean.boxes[:, 1:]) and torch.equal(plain.flip[:, 1:], clean.flip[:, 1:])
    assert not clean.flip[:, 0].any()
    # identity crop: the view is the image itself and the stored logits are the ensemble of the image
    x0 = apply_crop_flip(images, clean.view_params(0), 16)
    torch.testing.assert_close(x0, images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean.logits[:, 0].float(), ensemble(images).half().float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("num_views, batch_size, most", [(3, 7, 6), (10, 4, 10), (3, 1000, 72)])
def test_relabel_forwards_a_bounded_number_of_crops(images, num_views, batch_size, most) -> None:
    """Each teacher forward holds max(1, batch_size // V) images' V views, never batch_size * V crops
    (a 6.5 GB peak for 100 images x 300 views on Fashion-MNIST before)."""
    seen: list[int] = []
    teacher = tiny_teacher(3)
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    st = run_relabel(images, TeacherEnsemble([teacher]), num_views=num_views, out_size=16, batch_size=batch_size,
                     cutmix_prob=0.5, show_progress=False)
    assert max(seen) == most and sum(seen) == len(images) * num_views
    ref = run_relabel(images, TeacherEnsemble([teacher]), num_views=num_views, out_size=16, batch_size=10_000,
                      cutmix_prob=0.5, show_progress=False)
    torch.testing.assert_close(st.logits.float(), ref.logits.float(), atol=2e-3, rtol=2e-3)


# ---- CutMix of the stored views ----------------------------------------------------------


def _paste_reference(own: torch.Tensor, partner: torch.Tensor, box) -> torch.Tensor:
    """One view's CutMix written out with slices: rows y1:y2, columns x1:x2 of the partner's view."""
    y1, y2, x1, x2 = (int(b) for b in box)
    out = own.clone()
    out[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
    return out


def test_view_cutmix_draws_follow_the_cutmix_rule() -> None:
    partner, boxes = sample_view_cutmix(40, 3, 12, prob=1.0, seed=4)
    assert partner.dtype == torch.int32 and boxes.dtype == torch.int16
    for v in range(3):  # one permutation of the images per view: each image pasted exactly once
        assert sorted(partner[:, v].tolist()) == list(range(40))
        rng = np.random.default_rng(derive_seed(4, "cutmix", v))  # the documented draw, replayed by hand
        perm, _ = rng.permutation(40), rng.random(40)
        lam0, centre = rng.beta(1.0, 1.0, 40), rng.random((40, 2))
        assert partner[:, v].tolist() == perm.tolist()
        for i in range(40):
            cut = int(12 * float(np.sqrt(1 - lam0[i])))
            cy, cx = int(centre[i, 0] * 12), int(centre[i, 1] * 12)
            expected = [max(cy - cut // 2, 0), min(cy + cut - cut // 2, 12), max(cx - cut // 2, 0),
                        min(cx + cut - cut // 2, 12)]
            assert boxes[i, v].tolist() == expected
    half, half_boxes = sample_view_cutmix(400, 2, 12, prob=0.5, seed=4)
    unmixed = half < 0
    assert 0.4 < unmixed.float().mean() < 0.6 and (half_boxes[unmixed] == 0).all()
    again = sample_view_cutmix(400, 2, 12, prob=0.5, seed=4)
    assert torch.equal(again[0], half) and torch.equal(again[1], half_boxes)
    none, none_boxes = sample_view_cutmix(5, 2, 12, prob=0.0)
    assert (none == -1).all() and (none_boxes == 0).all()
    with pytest.raises(GVBSMError, match="cutmix_prob"):
        sample_view_cutmix(5, 2, 12, prob=1.5)


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_stored_cutmix_logits_are_the_ensemble_of_the_mixed_view(images, ensemble, prob) -> None:
    st = run_relabel(images, ensemble, num_views=3, out_size=12, seed=2, batch_size=7, cutmix_prob=prob,
                     show_progress=False)
    assert st.has_mix and st.cutmix_prob == prob
    mixed_any = False
    for i in (0, 5, 23):
        for v in range(3):
            own = apply_crop_flip(images[i : i + 1], st.view_params(v, torch.tensor([i])), 12)
            j = int(st.mix_partner[i, v])
            partner, box, lam = st.mix_params(v, torch.tensor([i]))
            assert int(partner[0]) == j
            if j < 0:
                expected = own
                assert float(lam[0]) == 1.0 and (box == 0).all()
            else:
                other = apply_crop_flip(images[j : j + 1], st.view_params(v, torch.tensor([j])), 12)
                expected = _paste_reference(own, other, st.mix_boxes[i, v])
                y1, y2, x1, x2 = st.mix_boxes[i, v].tolist()
                assert float(lam[0]) == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 144)
                mixed_any = mixed_any or (y2 > y1 and x2 > x1)
            got = st.replay(images[i : i + 1], v, torch.tensor([i]), partner_images=images[partner.clamp(min=0)])
            assert torch.equal(got, expected)
            # the stored label is the teachers' on the MIXED view, not on the view alone
            torch.testing.assert_close(st.logits[i, v].float(), ensemble(expected)[0].half().float(),
                                       atol=1e-3, rtol=1e-3)
    assert mixed_any
    unmixed_labels = run_relabel(images, ensemble, num_views=3, out_size=12, seed=2, show_progress=False)
    assert torch.equal(unmixed_labels.boxes, st.boxes)  # same crops; only the pasting differs
    assert not torch.allclose(unmixed_labels.logits.float(), st.logits.float(), atol=1e-2)
    with pytest.raises(GVBSMError, match="partner_images"):
        st.replay(images, 0)


def test_stored_cutmix_survives_tables_and_files(images, ensemble, tmp_path) -> None:
    st = run_relabel(images, ensemble, num_views=2, out_size=16, seed=3, cutmix_prob=0.5, show_progress=False)
    for back in (StoredSoftLabels.from_rows(st.to_dataset()), StoredSoftLabels.load(st.save(tmp_path / "s"))):
        assert torch.equal(back.mix_partner, st.mix_partner) and torch.equal(back.mix_boxes, st.mix_boxes)
        assert back.mix_partner.dtype == torch.int32 and back.mix_boxes.dtype == torch.int16
        assert back.cutmix_prob == 0.5 and torch.equal(back.logits, st.logits)
    cols = st.to_arrays()
    del cols["views_mix_boxes"]
    with pytest.raises(DataValidationError, match="views_mix_boxes"):
        StoredSoftLabels.from_rows(cols, st.metadata())
    bad = dict(st.to_arrays(), views_mix_partner=np.full((24, 2), 99, dtype=np.int32))
    with pytest.raises(DataValidationError, match="another image set"):
        StoredSoftLabels.from_rows(bad, st.metadata())


# ---- top-k -------------------------------------------------------------------------------


def test_topk_keeps_the_topk_exact(images, ensemble) -> None:
    dense = run_relabel(images, ensemble, num_views=2, out_size=16, seed=3, show_progress=False)
    top = run_relabel(images, ensemble, num_views=2, out_size=16, seed=3, topk=3, show_progress=False)
    assert top.logits is None and top.topk == 3
    assert top.topk_indices.dtype == torch.int16 and top.topk_values.dtype == torch.float16
    for v in range(2):
        full = dense.dense_logits(v)
        rec = top.dense_logits(v)
        assert rec.shape == full.shape and torch.isfinite(rec).all()
        kept_idx = top.topk_indices[:, v].long()
        # kept classes: exactly the dense fp16 values, and exactly the 3 largest classes
        torch.testing.assert_close(rec.gather(1, kept_idx), full.gather(1, kept_idx), rtol=0, atol=0)
        assert torch.equal(rec.topk(3, dim=1).indices.sort(1).values, full.topk(3, dim=1).indices.sort(1).values)
        # missing classes: min(kept) - fill_margin, strictly below the kept ones
        mask = torch.ones_like(rec, dtype=torch.bool).scatter_(1, kept_idx, False)
        kept_min = rec.gather(1, kept_idx).min(1, keepdim=True).values
        expected_fill = (kept_min - top.fill_margin).expand_as(rec)
        torch.testing.assert_close(rec[mask], expected_fill[mask])
    with pytest.raises(GVBSMError, match="topk"):
        run_relabel(images[:2], ensemble, num_views=1, out_size=16, topk=11, show_progress=False)


# ---- tables ------------------------------------------------------------------------------


def _assert_same(a: StoredSoftLabels, b: StoredSoftLabels) -> None:
    assert torch.equal(a.boxes, b.boxes) and a.boxes.dtype == b.boxes.dtype
    assert torch.equal(a.flip, b.flip) and b.flip.dtype == torch.bool
    for name in ("logits", "topk_values", "topk_indices"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None)
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert a.metadata() == b.metadata()


@pytest.mark.parametrize("topk", [None, 4])
def test_rows_round_trip_exact(images, ensemble, tmp_path, topk) -> None:
    st = run_relabel(images, ensemble, num_views=3, out_size=16, seed=4, topk=topk, show_progress=False)
    rows = st.to_rows()
    assert len(rows["views_boxes"]) == len(images)
    assert set(rows) == ({"views_boxes", "views_flip", "soft_logits"} if topk is None
                         else {"views_boxes", "views_flip", "topk_values", "topk_indices"})
    _assert_same(st, StoredSoftLabels.from_rows(rows, st.metadata()))
    # list of row dicts
    row_list = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
    _assert_same(st, StoredSoftLabels.from_rows(row_list, st.metadata()))

    # through a datasets table and a parquet file
    ds = st.to_dataset()
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(images)
    _assert_same(st, StoredSoftLabels.from_rows(ds))  # metadata read from ds.info
    path = tmp_path / "labels.parquet"
    ds.to_parquet(str(path))
    back = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    _assert_same(st, StoredSoftLabels.from_rows(back, json.loads(json.dumps(st.metadata()))))

    # save / load folder
    st.save(tmp_path / "stored")
    _assert_same(st, StoredSoftLabels.load(tmp_path / "stored"))


# fp16 bit patterns a value-based comparison would miss: NaN with a payload, -0, the smallest
# subnormal, +-inf, the largest finite value
_FP16_SPECIALS = [0x7E01, 0x8000, 0x0001, 0x7C00, 0xFC00, 0x7BFF]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return {torch.float16: lambda: t.view(torch.int16), torch.float32: lambda: t.view(torch.int32)}.get(
        t.dtype, lambda: t
    )()


def _assert_bit_exact(a: StoredSoftLabels, b: StoredSoftLabels) -> None:
    for name in ("boxes", "flip", "logits", "topk_values", "topk_indices"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert tb.dtype == ta.dtype and tb.shape == ta.shape, name
            assert torch.equal(_bits(ta.contiguous()), _bits(tb)), name
    assert a.metadata() == b.metadata()


def _tricky_stored(kind: str, n: int = 23, v: int = 3) -> StoredSoftLabels:
    """Labels with special fp16 / float32 bit patterns and non-contiguous tensors."""
    g = torch.Generator().manual_seed(11)
    boxes = (torch.rand(v, n, 4, generator=g) * 31).transpose(0, 1)  # strided (N, V, 4)
    boxes[0, 0] = torch.tensor([-0.0, 1e-45, 3.4e38, 0.1])
    flip = torch.rand(n, v, generator=g) > 0.5
    specials = torch.tensor(_FP16_SPECIALS, dtype=torch.int32).to(torch.int16).view(torch.float16)
    common = dict(boxes=boxes, flip=flip, image_size=(32, 31), out_size=17, seed=9, crop_scale=(0.2, 0.9),
                  clean_view=True, logit_norm=True, fill_margin=0.5, extra={"teachers": ["a", "b"]})
    if kind == "dense":
        k = 7
        logits = (torch.randn(n, k, v, generator=g) * 50).half().transpose(1, 2)  # strided (N, V, K)
        logits[1, 2, : len(specials)] = specials
        return StoredSoftLabels(num_classes=k, logits=logits, **common)
    k, idx_dtype = {"topk_int16": (32767, torch.int16), "topk_int32": (40000, torch.int32)}[kind]
    values = (torch.randn(n, v, len(specials), generator=g) * 50).half()
    values[2, 1] = specials
    indices = torch.randint(0, k, (n, v, len(specials)), generator=g).to(idx_dtype)
    indices[0, 0, :2] = torch.tensor([0, k - 1])
    return StoredSoftLabels(num_classes=k, topk_values=values, topk_indices=indices, **common)


@pytest.mark.parametrize("kind", ["dense", "topk_int16", "topk_int32"])
def test_save_load_round_trip_is_bit_exact(tmp_path, kind) -> None:
    st = _tricky_stored(kind)
    folder = st.save(tmp_path / "stored")
    assert [p.name for p in folder.iterdir()] == [STORED_LABELS_FILE]  # one file, metadata in its header
    _assert_bit_exact(st, StoredSoftLabels.load(folder))
    st.save(tmp_path / "stored")  # overwriting is atomic too
    _assert_bit_exact(st, StoredSoftLabels.load(folder))
    # the export's parquet, through datasets' own parquet reader, and the in-memory table
    path = tmp_path / "views.parquet"
    st.to_dataset().to_parquet(str(path), batch_size=1)  # one row per row group
    assert pq.ParquetFile(path).metadata.num_row_groups == len(st)
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    _assert_bit_exact(st, StoredSoftLabels.from_rows(ds, st.metadata()))
    _assert_bit_exact(st, StoredSoftLabels.from_rows(st.to_dataset()))
    _assert_bit_exact(st, StoredSoftLabels.from_rows(st.to_arrays(), st.metadata()))


def test_tables_keep_the_list_built_schema(tmp_path) -> None:
    """Same columns, features and parquet schema as a table built from Python lists, whose parquet
    files (as exported before the tables went through Arrow buffers) still load."""
    for kind in ("dense", "topk_int16"):
        st = _tricky_stored(kind)
        listed = datasets.Dataset.from_dict(st.to_rows(), features=st.features())
        ds = st.to_dataset()
        assert ds.column_names == listed.column_names and ds.features == listed.features
        assert ds.data.schema.equals(listed.data.schema, check_metadata=True)
        old, new = tmp_path / f"old_{kind}.parquet", tmp_path / f"new_{kind}.parquet"
        listed.to_parquet(str(old))
        ds.to_parquet(str(new))
        assert pq.read_schema(new).equals(pq.read_schema(old), check_metadata=True)
        back = datasets.Dataset.from_parquet(str(old), cache_dir=str(tmp_path / "cache"))
        _assert_bit_exact(st, StoredSoftLabels.from_rows(back, st.metadata()))


def test_run_folder_of_the_parquet_format_names_the_redo(tmp_path) -> None:
    """A run folder written before the safetensors file (soft_labels.parquet + its JSON) is not read:
    the error says to recompute it with `--redo relabel`; saving there removes the old files."""
    st = _tricky_stored("dense")
    folder = tmp_path / "relabel" / "gvbsm"
    folder.mkdir(parents=True)
    st.to_dataset().to_parquet(str(folder / LEGACY_FILES[0]))
    (folder / LEGACY_FILES[1]).write_text(json.dumps(st.metadata()))
    with pytest.raises(GVBSMError, match="--redo relabel") as err:
        StoredSoftLabels.load(folder)
    assert "soft_labels.parquet" in str(err.value)
    st.save(folder)
    assert [p.name for p in folder.iterdir()] == [STORED_LABELS_FILE]
    _assert_bit_exact(st, StoredSoftLabels.load(folder))


@pytest.mark.parametrize("kind", ["dense", "topk_int16"])
def test_to_dataset_is_built_from_the_tensor_buffers(kind) -> None:
    st = _tricky_stored(kind, n=9)
    tensors = ("boxes", "logits", "topk_values", "topk_indices")
    st = dataclasses.replace(
        st, **{name: getattr(st, name).contiguous() for name in tensors if getattr(st, name) is not None}
    )
    n, v = len(st), st.num_views
    ds = st.to_dataset()
    cols = ds.with_format("numpy")[:]
    assert cols["views_boxes"].dtype == np.float32 and cols["views_boxes"].shape == (n, v, 4)
    assert cols["views_flip"].dtype == np.bool_ and cols["views_flip"].shape == (n, v)
    np.testing.assert_array_equal(cols["views_boxes"], st.boxes.numpy())
    np.testing.assert_array_equal(cols["views_flip"], st.flip.numpy())
    names = ["soft_logits"] if kind == "dense" else ["topk_values", "topk_indices"]
    assert set(cols) == {"views_boxes", "views_flip", *names}
    for name in names:
        t = st.logits if name == "soft_logits" else getattr(st, name)
        assert cols[name].shape == tuple(t.shape)  # datasets' numpy format widens fp16 to float32, exactly
        np.testing.assert_array_equal(cols[name], t.numpy().astype(cols[name].dtype))
    # Arrow keeps the stored dtypes, and the values are the tensors' own memory: no per-element copy
    for name, t in [("views_boxes", st.boxes)] + [
        (name, st.logits if name == "soft_logits" else getattr(st, name)) for name in names
    ]:
        chunks = ds.data.column(name).chunks
        assert len(chunks) == 1
        leaf = chunks[0].storage.flatten().flatten()
        assert leaf.type == pa.from_numpy_dtype(t.numpy().dtype), name
        assert leaf.buffers()[1].address == t.data_ptr(), name
    # reading back copies into new tensors
    back = StoredSoftLabels.from_rows(ds)
    values = back.logits if kind == "dense" else back.topk_values
    assert values.data_ptr() != (st.logits if kind == "dense" else st.topk_values).data_ptr()
    values.zero_()
    back.boxes.zero_()
    _assert_bit_exact(st, StoredSoftLabels.from_rows(ds))


def test_from_rows_follows_dataset_selection_and_rejects_ragged_rows() -> None:
    st = _tricky_stored("dense", n=8)
    picked = StoredSoftLabels.from_rows(st.to_dataset().select([5, 0, 2]))
    assert torch.equal(_bits(picked.logits), _bits(st.logits[[5, 0, 2]].contiguous()))
    assert torch.equal(picked.boxes, st.boxes[[5, 0, 2]]) and torch.equal(picked.flip, st.flip[[5, 0, 2]])

    meta = dict(st.metadata(), num_views=1, num_classes=2)
    ragged = {"views_boxes": [[[0.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]]],
              "views_flip": [[False], [True, False]], "soft_logits": [[[0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]}
    with pytest.raises(DataValidationError, match="different lengths"):
        StoredSoftLabels.from_rows(datasets.Dataset.from_dict(ragged), meta)
    with pytest.raises(DataValidationError, match="different shapes"):
        StoredSoftLabels.from_rows(ragged, meta)
    holes = {"views_boxes": [[[0.0, 0.0, 1.0, 1.0]], None], "views_flip": [[False], [True]],
             "soft_logits": [[[0.0, 1.0]], [[1.0, 0.0]]]}
    with pytest.raises(DataValidationError, match="missing values"):
        StoredSoftLabels.from_rows(datasets.Dataset.from_dict(holes), meta)


def test_bfloat16_logits_name_the_fix() -> None:
    st = StoredSoftLabels(boxes=torch.zeros(2, 1, 4), flip=torch.zeros(2, 1, dtype=torch.bool), num_classes=3,
                          image_size=(8, 8), out_size=8, logits=torch.zeros(2, 1, 3, dtype=torch.bfloat16))
    with pytest.raises(GVBSMError, match="float16"):
        st.to_dataset()


def test_bad_inputs_name_the_fix(images, ensemble, tmp_path) -> None:
    raw, _ = digits_uint8(4)
    with pytest.raises(DataValidationError, match="normalize"):
        run_relabel(raw, ensemble, num_views=1, out_size=16)
    st = run_relabel(images[:3], ensemble, num_views=2, out_size=16, show_progress=False)
    meta = st.metadata()
    del meta["out_size"]
    with pytest.raises(DataValidationError, match="metadata"):
        StoredSoftLabels.from_rows(st.to_rows(), meta)
    with pytest.raises(GVBSMError, match="relabel"):
        StoredSoftLabels.load(tmp_path / "missing")
    with pytest.raises(GVBSMError, match="re-run relabel_stored"):
        st.dense_logits(0, torch.tensor([5]))
    with pytest.raises(GVBSMError, match="one view per image"):
        st.dense_logits(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))


# ---- two processes -----------------------------------------------------------------------

TWO_PROC_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from gvbsm_hf.ensemble import TeacherEnsemble
    from gvbsm_hf.relabel.config import RelabelArguments
    from gvbsm_hf.relabel.engine import relabel_stored
    from gvbsm_hf.relabel.views import ViewSampling

    def teacher():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, 10)).eval()

    acc = Accelerator(cpu=True)
    assert acc.num_processes == int(sys.argv[2]), acc.num_processes
    x = torch.randn(11, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    st = relabel_stored(x, TeacherEnsemble([teacher()]), RelabelArguments(relabel_num_views=2), ViewSampling(16),
                        batch_size=3, accelerator=acc, show_progress=False)
    st.save(sys.argv[1] + f"/rank{acc.process_index}")
    """
)


def test_two_processes_give_the_single_process_result(tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(TWO_PROC_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), str(out), str(nproc)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = [StoredSoftLabels.load(out / f"rank{r}") for r in range(nproc)]
    ref = results[1][0]
    # batches 0, 2 on rank 0 and 1, 3 on rank 1; every process returns the full, identical result
    for got in results[2]:
        _assert_same(ref, got)
