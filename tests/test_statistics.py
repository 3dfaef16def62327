"""Record stage (Eq. 9): global Conv statistics, files, tables, 1 vs 2 processes."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gvbsm_hf.augment_families as aug  # the families look random_resized_crop_flip up here (monkeypatched)

from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.errors import DataValidationError, StatisticsMismatchError
from gvbsm_hf.record.config import StatisticsArguments
from gvbsm_hf.record.engine import record_statistics
from gvbsm_hf.record.statistics_file import (
    TeacherStatistics, load_statistics, save_statistics, statistics_from_dataset, statistics_to_dataset,
)
from gvbsm_hf.fingerprint import model_fingerprint

STATS = ("channel_mean", "channel_var", "patch_mean", "patch_var")
SPEC = DatasetSpec(name="toy", num_classes=3, image_size=9, channels=1, mean=(0.4,), std=(0.3,))
RRC = StatisticsArguments(stats_patch_size=4, stats_augment="per_image_rrc")

# Shared by the test process and the torchrun script.
SHARED = textwrap.dedent(
    '''
    import torch
    from torch import nn

    def make_teacher():
        torch.manual_seed(1234)
        model = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        return model
    '''
)
_ns: dict = {}
exec(SHARED, _ns)
make_teacher = _ns["make_teacher"]


def reference_conv_stats(x: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """Float64 statistics from the definitions (Eq. 9 per batch): loops over the patch grid."""
    x = x.double()
    n, c, h, w = x.shape
    cm = x.mean(dim=(0, 2, 3))
    out = {"channel_mean": cm, "channel_var": ((x - cm.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))}
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    pm, pv = torch.zeros(gh, gw, dtype=torch.float64), torch.zeros(gh, gw, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            block = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            pm[i, j] = block.mean()
            pv[i, j] = ((block - block.mean()) ** 2).mean()
    out.update(patch_mean=pm, patch_var=pv)
    return out


def make_batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 256, (n, 1, 9, 9), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def weighted_reference(model: nn.Module, inputs: list[torch.Tensor], p: int, target: str):
    """sum_b n_b stat_b / sum_b n_b in float64 (Eq. 9) with a float64 copy of the teacher."""
    model64 = copy.deepcopy(model).double().eval()
    store: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: store.__setitem__(name, a[0] if target == "input" else o))
        for name, m in model64.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    sums: dict[str, dict[str, torch.Tensor]] = {}
    total = 0
    with torch.no_grad():
        for x in inputs:
            store.clear()
            model64(x.double())
            for name, t in store.items():
                for k, v in reference_conv_stats(t, p).items():
                    sums.setdefault(name, {})[k] = sums.get(name, {}).get(k, 0) + x.shape[0] * v
            total += x.shape[0]
    for h in handles:
        h.remove()
    return {name: {k: v / total for k, v in d.items()} for name, d in sums.items()}, total


@pytest.mark.parametrize("augment,target", [(False, "input"), (True, "output")])
def test_record_equals_float64_weighted_mean_of_batch_stats(monkeypatch, augment, target):
    seen: list[torch.Tensor] = []
    if augment:
        real = aug.random_resized_crop_flip

        def spy(x, **kw):
            assert kw["scale"] == (0.25, 1.0) and isinstance(kw["generator"], torch.Generator)
            out = real(x, **kw)
            seen.append(out.detach().clone())
            return out

        monkeypatch.setattr(aug, "random_resized_crop_flip", spy)
    teacher = make_teacher().train()  # record must switch to eval and restore
    rm_before = teacher[1].running_mean.clone()
    batches = make_batches([4, 4, 3])
    args = StatisticsArguments(stats_patch_size=4, stats_conv_target=target,
                               stats_augment="per_image_rrc" if augment else "none")
    stats = record_statistics(teacher, batches, SPEC, args, crop_scale=(0.25, 1.0), teacher_name="toy-net")
    assert teacher.training and torch.equal(teacher[1].running_mean, rm_before)
    inputs = seen if augment else [SPEC.normalize(b[0]) for b in batches]
    assert len(inputs) == 3
    ref, total = weighted_reference(teacher, inputs, 4, target)
    assert stats.layer_names == ["0", "3", "6"]
    for name, d in ref.items():
        for k in STATS:
            got = stats.layers[name][k]
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            torch.testing.assert_close(got.double(), d[k], rtol=1e-5, atol=1e-6)
    assert stats.layers["0"]["patch_mean"].shape == (3, 3)  # 9x9 map, p=4: partial last patches
    prov = stats.provenance
    assert prov["num_images"] == total == 11
    assert prov["teacher_fingerprint"] == model_fingerprint(teacher)
    assert (prov["patch_size"], prov["conv_target"], prov["augment"]) == (4, target, "per_image_rrc" if augment else "none")
    assert prov["dataset"] == "toy" and prov["teacher_name"] == "toy-net" and prov["split"] == "train"
    assert "per-batch biased variances" in prov["variance_definition"]
    if augment:
        assert json.loads(prov["crop_scale"]) == [0.25, 1.0]
    # the augmentation is seeded by (seed, batch index): the same call gives the same statistics
    again = record_statistics(teacher, batches, SPEC, args, crop_scale=(0.25, 1.0))
    for name in ref:
        for k in STATS:
            assert torch.equal(again.layers[name][k], stats.layers[name][k])


def test_one_and_two_processes_agree(tmp_path):
    sizes = [5, 5, 5, 5, 5, 5, 2]
    batches = make_batches(sizes, seed=7)
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "shared.py").write_text(SHARED)
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(tmp_path)!r})
            import torch
            from accelerate import Accelerator
            from shared import make_teacher
            from gvbsm_hf.data import DatasetSpec
            from gvbsm_hf.record.config import StatisticsArguments
            from gvbsm_hf.record.engine import record_statistics
            from gvbsm_hf.record.statistics_file import save_statistics
            spec = DatasetSpec(**{SPEC.to_dict()!r})
            acc = Accelerator(cpu=True)
            assert acc.num_processes == 2, acc.num_processes
            batches = torch.load({str(tmp_path / "batches.pt")!r})
            for tag, bs in (("all", batches), ("one", batches[:1])):  # "one": process 1 has no batch
                shard = bs[acc.process_index :: acc.num_processes]
                stats = record_statistics(make_teacher(), shard, spec, StatisticsArguments(stats_augment="per_image_rrc"),
                                          accelerator=acc, seed=3, total_batches=len(bs))
                save_statistics(stats, {str(tmp_path)!r} + f"/{{tag}}-rank{{acc.process_index}}.safetensors")
            acc.wait_for_everyone()
            torch.distributed.destroy_process_group()
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for tag, bs in (("all", batches), ("one", batches[:1])):
        single = record_statistics(make_teacher(), bs, SPEC, RRC, seed=3)
        for rank in (0, 1):
            multi = load_statistics(tmp_path / f"{tag}-rank{rank}.safetensors")
            assert multi.provenance["num_images"] == single.provenance["num_images"] == sum(b[0].shape[0] for b in bs)
            assert multi.layer_names == single.layer_names
            for name in single.layers:
                for k in STATS:
                    torch.testing.assert_close(multi.layers[name][k], single.layers[name][k], rtol=1e-5, atol=1e-6)
    # a different seed gives other crops, hence other statistics (the seed is really used)
    other = record_statistics(make_teacher(), batches, SPEC, RRC, seed=4)
    base = record_statistics(make_teacher(), batches, SPEC, RRC, seed=3)
    assert not torch.equal(other.layers["0"]["channel_var"], base.layers["0"]["channel_var"])


def _stats(seed: int = 0) -> TeacherStatistics:
    teacher = make_teacher()
    return record_statistics(teacher, make_batches([3, 2], seed=seed), SPEC, teacher_name=f"t{seed}")


def test_save_load_round_trip_exact(tmp_path):
    stats = _stats()
    path = save_statistics(stats, tmp_path / "sub" / "stats.safetensors")
    loaded = load_statistics(path, expect_fingerprint=stats.provenance["teacher_fingerprint"], expect_patch_size=4,
                             expect_conv_target="input", expect_layers=["0", "3", "6"])
    assert loaded.provenance == stats.provenance
    assert loaded.layer_names == stats.layer_names
    for name, d in stats.layers.items():
        assert set(loaded.layers[name]) == set(STATS)
        for k in STATS:
            assert torch.equal(loaded.layers[name][k], d[k])


def test_load_mismatches_name_the_fix(tmp_path):
    stats = _stats()
    path = save_statistics(stats, tmp_path / "stats.safetensors")
    other_teacher = make_teacher()
    other_teacher[0].weight.data.add_(1.0)
    other_fp = model_fingerprint(other_teacher)
    cases = [
        (dict(expect_fingerprint=other_fp), [other_fp, stats.provenance["teacher_fingerprint"]]),
        (dict(expect_patch_size=16), ["patch_size", "16"]),
        (dict(expect_conv_target="output"), ["conv_target", "output"]),
        (dict(expect_layers=["0", "3", "6", "9"]), ["missing", "'9'"]),
        (dict(expect_layers=["0", "3"]), ["unexpected", "'6'"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(StatisticsMismatchError) as err:
            load_statistics(path, **kwargs)
        message = str(err.value)
        assert "--redo record" in message, message
        for w in words:
            assert w in message, (w, message)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StatisticsMismatchError, match="not a gvbsm-hf statistics file.*--redo record"):
        load_statistics(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="record stage"):
        load_statistics(tmp_path / "missing.safetensors")


def test_statistics_dataset_round_trip(tmp_path):
    a, b = _stats(0), _stats(1)
    b.provenance["teacher_name"] = "other"
    ds = statistics_to_dataset([a, b])
    assert len(ds) == 2 * 3 * 4
    assert {"teacher", "teacher_fingerprint", "layer", "statistic", "shape", "values"} <= set(ds.column_names)
    row = ds[0]
    assert (row["teacher"], row["layer"], row["statistic"]) == ("t0", "0", "channel_mean")
    assert row["shape"] == [1] and len(row["values"]) == 1  # input of the first conv: 1 image channel
    assert (ds[2]["statistic"], ds[2]["shape"]) == ("patch_mean", [3, 3])  # 9x9 map, p=4
    ds.to_parquet(str(tmp_path / "stats.parquet"))
    back = statistics_from_dataset(datasets.Dataset.from_parquet(str(tmp_path / "stats.parquet")))
    assert len(back) == 2
    for orig, rt in zip((a, b), back):
        assert rt.provenance == orig.provenance and rt.layer_names == orig.layer_names
        for name in orig.layers:
            for k in STATS:
                assert torch.equal(rt.layers[name][k], orig.layers[name][k])


def test_bad_inputs_raise_with_fix():
    with pytest.raises(DataValidationError, match="no images"):
        record_statistics(make_teacher(), [], SPEC)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(81, 3))
    with pytest.raises(DataValidationError, match="syn_r_conv: 0"):
        record_statistics(mlp, make_batches([2]), SPEC)
