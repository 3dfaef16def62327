"""The run folder's stored soft labels: one safetensors file, read lazily, torn files named with
``--redo relabel``; the relabel stage caches it (docs/stages.md "Relabel")."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.relabel.config import RelabelArguments
from gvbsm_hf.relabel.engine import build_ensemble, relabel_stored, stored_view_count
from gvbsm_hf.relabel.stage import RelabelStage
from gvbsm_hf.relabel.store import LEGACY_FILES, STORED_LABELS_FILE, StoredSoftLabels
from gvbsm_hf.relabel.tables import METADATA_KEY
from gvbsm_hf.relabel.views import ViewSampling

TENSORS = ("boxes", "flip", "logits", "topk_values", "topk_indices", "mix_partner", "mix_boxes")


def _labels(n: int = 40, v: int = 3, k: int = 10, *, topk: int | None = None, mix: bool = False,
            dtype: torch.dtype = torch.float16) -> StoredSoftLabels:
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(n, v, 2, generator=g) * 8
    kwargs = {}
    if topk is None:
        kwargs["logits"] = (torch.randn(n, v, k, generator=g) * 9).to(dtype)
    else:
        vals, idx = (torch.randn(n, v, k, generator=g) * 9).topk(topk, dim=-1)
        kwargs.update(topk_values=vals.to(dtype), topk_indices=idx.to(torch.int16 if k <= 32767 else torch.int32))
    if mix:
        kwargs.update(mix_partner=torch.randint(-1, n, (n, v), generator=g, dtype=torch.int32),
                      mix_boxes=torch.randint(0, 16, (n, v, 4), generator=g).to(torch.int16), cutmix_prob=0.5)
    return StoredSoftLabels(boxes=torch.cat([xy, xy + 8], dim=-1), flip=torch.rand(n, v, generator=g) > 0.5,
                            num_classes=k, image_size=(16, 16), out_size=16, seed=3, extra={"teachers": ["a"]},
                            **kwargs)


def _assert_identical(a: StoredSoftLabels, b: StoredSoftLabels) -> None:
    for name in TENSORS:
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
            bits = (lambda t: t) if ta.dtype == torch.bool else (lambda t: t.contiguous().view(torch.uint8))
            assert torch.equal(bits(ta), bits(tb)), name
    assert a.metadata() == b.metadata()


@pytest.mark.parametrize("kind", ["dense_fp16", "dense_fp32", "dense_bf16", "topk_mix", "topk_int32"])
def test_file_round_trip_keeps_tensors_and_dtypes(tmp_path, kind) -> None:
    st = {"dense_fp16": lambda: _labels(),
          "dense_fp32": lambda: _labels(dtype=torch.float32),
          "dense_bf16": lambda: _labels(dtype=torch.bfloat16),  # the file holds what Arrow cannot
          "topk_mix": lambda: _labels(topk=4, mix=True),
          "topk_int32": lambda: _labels(k=40000, topk=2)}[kind]()
    folder = st.save(tmp_path / "relabel")
    assert [p.name for p in folder.iterdir()] == [STORED_LABELS_FILE]
    back = StoredSoftLabels.load(folder)
    _assert_identical(st, back)
    for v in range(st.num_views):
        assert torch.equal(back.dense_logits(v), st.dense_logits(v))


def test_file_is_read_lazily_and_copy_on_write(tmp_path) -> None:
    """Loading maps the file: nothing is read until used, and what a batch reads stays file-backed
    page cache (the OS may drop it) instead of a private copy of the file, so an ImageNet-scale file
    is never loaded whole; writing a loaded tensor never reaches the file."""
    n, v, k = 20_000, 4, 250  # 40 MB of fp16 logits
    st = StoredSoftLabels(boxes=torch.zeros(n, v, 4), flip=torch.zeros(n, v, dtype=torch.bool), num_classes=k,
                          image_size=(8, 8), out_size=8, logits=torch.ones(n, v, k, dtype=torch.float16))
    folder = st.save(tmp_path / "big")
    del st

    def memory_mb() -> dict[str, float]:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f
                    if line.startswith(("VmRSS:", "RssAnon:"))}

    before = memory_mb()
    back = StoredSoftLabels.load(folder)
    assert memory_mb()["VmRSS"] - before["VmRSS"] < 8, "load read the 40 MB file"
    ptr = back.logits.data_ptr()  # the logits are the file's pages, not a copy
    with open("/proc/self/maps") as f:
        mapped = [line.split()[-1] for line in f
                  if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)]
    assert mapped == [str(folder / STORED_LABELS_FILE)]
    some = back.dense_logits(1, torch.arange(0, n, 997))  # 21 rows out of 20000
    assert memory_mb()["RssAnon"] - before["RssAnon"] < 8, "reading 21 rows copied the 40 MB file"
    assert some.shape == (21, k) and bool((some == 1).all())
    back.logits[0, 0, 0] = 7  # private mapping: the file keeps its value
    assert float(StoredSoftLabels.load(folder).logits[0, 0, 0]) == 1.0


def _damaged_bytes(data: bytes, case: str) -> bytes:
    header_len = struct.unpack("<Q", data[:8])[0]
    return {
        "truncated_data": data[:-1],
        "truncated_middle": data[: 8 + header_len + (len(data) - 8 - header_len) // 2],
        "truncated_header": data[: 8 + header_len // 2],
        "empty": b"",
        "garbage_header": data[:8] + b"{" * header_len + data[8 + header_len :],
    }[case]


@pytest.mark.parametrize("case", ["truncated_data", "truncated_middle", "truncated_header", "empty",
                                  "garbage_header", "no_metadata", "foreign", "wrong_dtype"])
def test_damaged_file_names_the_file_and_the_redo(tmp_path, case) -> None:
    st = _labels(topk=3, mix=True)
    folder = st.save(tmp_path / "relabel")
    path = folder / STORED_LABELS_FILE
    if case == "no_metadata":
        save_file({name: t.contiguous() for name, t in st.tensors().items()}, str(path))
    elif case == "foreign":
        save_file({"weights": torch.zeros(3)}, str(path), metadata={METADATA_KEY: json.dumps(st.metadata())})
    elif case == "wrong_dtype":
        tensors = dict(st.tensors(), topk_values=st.topk_values.float())
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(path),
                  metadata={METADATA_KEY: json.dumps(st.metadata())})
    else:
        path.write_bytes(_damaged_bytes(path.read_bytes(), case))
    with pytest.raises(GVBSMError) as err:
        StoredSoftLabels.load(folder)
    assert str(path) in str(err.value) and "--redo relabel" in str(err.value)


# ---- the stage: caches the file ----------------------------------------------------------


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def _ctx(tmp_path, redo=(), mode: str = "stored", views=None):
    images = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    synthetic = SimpleNamespace(shipped_images=lambda spec: images)
    recipe = SimpleNamespace(
        relabel=RelabelArguments(relabel_mode=mode, relabel_teachers=["b"], relabel_num_views=views, relabel_seed=4),
        squeeze=SimpleNamespace(teachers=["a", "b"]), synthesis=SimpleNamespace(syn_mixed_precision="no"),
        training=SimpleNamespace(num_train_epochs=2.5, student_crop_scale=[0.5, 1.0], cutmix_prob=0.5))
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_local_main_process=True, is_main_process=True,
                                  num_processes=1, process_index=0)
    ctx = SimpleNamespace(recipe=recipe, output_dir=tmp_path, teachers=[_teacher(1), _teacher(2)],
                          spec=SimpleNamespace(image_size=16), synthetic={"gvbsm": synthetic}, main_method="gvbsm",
                          stored={}, accelerator=accelerator,
                          cache=SimpleNamespace(redo_requested=lambda name: name in redo))
    return ctx, images


def test_stage_computes_caches_and_reloads_the_file(tmp_path) -> None:
    stage = RelabelStage()
    ctx, images = _ctx(tmp_path)
    stage.run(ctx)
    folder = tmp_path / "relabel" / "gvbsm"
    assert stage.outputs(ctx) == [folder / STORED_LABELS_FILE] and (folder / STORED_LABELS_FILE).is_file()
    assert len(ctx.ensemble.teachers) == 1  # relabel_teachers: ["b"]
    st = ctx.stored["gvbsm"]
    assert st.num_views == stored_view_count(ctx.recipe.relabel, 2.5) == 3 and st.has_mix and st.seed == 4
    assert st.crop_scale == (0.5, 1.0) and st.out_size == 16
    # the engine alone gives the same labels
    ens = build_ensemble([_teacher(1), _teacher(2)], ["a", "b"], ctx.recipe.relabel)
    args = RelabelArguments(relabel_num_views=3, relabel_seed=4)
    ref = relabel_stored(images, ens, args, ViewSampling(16, crop_scale=(0.5, 1.0), cutmix_prob=0.5),
                         show_progress=False)
    _assert_identical(st, ref)
    again, _ = _ctx(tmp_path)
    stage.load(again)  # not selected: loaded from the file
    _assert_identical(st, again.stored["gvbsm"])


def test_stage_replaces_the_parquet_format_or_names_the_redo(tmp_path) -> None:
    stage = RelabelStage()
    folder = tmp_path / "relabel" / "gvbsm"
    folder.mkdir(parents=True)
    for name in LEGACY_FILES:
        (folder / name).write_text("an earlier version's files")
    ctx, _ = _ctx(tmp_path, views=2)
    with pytest.raises(GVBSMError, match="--redo relabel"):
        stage.load(ctx)  # a later stage alone would otherwise run without the stored labels
    stage.run(ctx)  # the stage itself recomputes them
    assert [p.name for p in folder.iterdir()] == [STORED_LABELS_FILE]
    assert ctx.stored["gvbsm"].num_views == 2
    ctx, _ = _ctx(tmp_path, redo=("relabel",), views=1)
    stage.run(ctx)
    assert StoredSoftLabels.load(folder).num_views == 1
