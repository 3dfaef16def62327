"""The EDC / RDED design space (issue 15): real-crop selection (``rded``, ``syn_init: rded``), soft
category-aware matching (per-class statistics, ``syn_class_weight``), the student EMA and the
smoothing schedule of the evaluation Trainer, and the honest scores (docs/method.md "Scores")."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, STATS_ARGS, digits_uint8, make_teachers, small_args  # noqa: E402

from gvbsm_hf.backbones import create_backbone  # noqa: E402
from gvbsm_hf.evaluate.config import GVBSMTrainingArguments  # noqa: E402
from gvbsm_hf.validation import RecipeError
from gvbsm_hf.recover.config import SynthesisArguments
from gvbsm_hf.data import DatasetSpec  # noqa: E402
from gvbsm_hf.errors import GVBSMError, StatisticsMismatchError  # noqa: E402
from gvbsm_hf.methods import SynthesisStep, get_method, method_config  # noqa: E402
from gvbsm_hf.methods.gvbsm import matching_loss  # noqa: E402
from gvbsm_hf.methods.selection import (  # noqa: E402
    combine_features, kmeans, select_boundary, select_clustered, select_facility_location, select_kcenter,
    teacher_features)
from gvbsm_hf.scores import label_robust_score, scores  # noqa: E402
from gvbsm_hf.record.config import StatisticsArguments  # noqa: E402
from gvbsm_hf.record.engine import record_statistics  # noqa: E402
from gvbsm_hf.record.statistics_file import load_statistics, save_statistics  # noqa: E402
from gvbsm_hf.recover.teacher_slot import TeacherSlot  # noqa: E402
from gvbsm_hf.recover.engine import recover
from gvbsm_hf.evaluate.datasets import RealImageDataset, SyntheticImageDataset  # noqa: E402
from gvbsm_hf.evaluate.trainer import GVBSMTrainer  # noqa: E402

# ------------------------------------------------------------------------------------------ rded

GREY = DatasetSpec(name="const", num_classes=2, image_size=8, channels=1, mean=(0.5,), std=(0.5,))
VALUES = [7 + 12 * j for j in range(20)]  # class-0 images: constant grey levels, m = 2 v / 255 - 1


class _Poly(nn.Module):
    """Logits ``(coef_1 m + coef_2 m^2, 0)`` with ``m`` the mean of the (normalised) view."""

    def __init__(self, c1: float, c2: float) -> None:
        super().__init__()
        self.c1, self.c2 = c1, c2

    def forward(self, x):
        m = x.double().mean(dim=(1, 2, 3))
        return torch.stack([self.c1 * m + self.c2 * m * m, torch.zeros_like(m)], dim=1).float()


def _grey_data():
    x0 = torch.tensor(VALUES, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    x1 = torch.full((6, 1, 8, 8), 100, dtype=torch.uint8)
    return torch.cat([x0, x1]), torch.tensor([0] * len(VALUES) + [1] * 6)


def _expected_rank(teachers) -> list[int]:
    """float64 reference: class-0 CE of the mean of the teachers' logits, per grey level, best first."""
    m = torch.tensor([2 * v / 255 - 1 for v in VALUES], dtype=torch.float64)
    z = torch.stack([t.c1 * m + t.c2 * m * m for t in teachers]).mean(0)
    ce = torch.log1p(torch.exp(-z))  # -log softmax([z, 0])_0
    return torch.argsort(ce).tolist()


@pytest.mark.parametrize("factor", [1, 2])
def test_rded_keeps_the_crops_with_the_lowest_ensemble_ce(tmp_path, factor):
    """Every crop of a constant image has that image's grey level, so a crop's ensemble CE depends only
    on its image: the kept crops must be those of the images whose reference CE is lowest, best first,
    and with factor 2 image t's tiles hold ranks t, ipc + t, 2 ipc + t, 3 ipc + t (row-major)."""
    teachers = [_Poly(2.0, 0.0), _Poly(0.0, -2.0)]  # alone: brightest / mid-grey; together: m closest to 0.5
    rank = _expected_rank(teachers)
    assert rank[:2] != _expected_rank(teachers[:1])[:2]  # the ensemble changes the choice
    ipc = 2
    config = method_config("rded", ipc=ipc, syn_rded_factor=factor, syn_rded_candidates=len(VALUES), syn_seed=4)
    out = recover(teachers, [None, None], GREY, config, output_dir=tmp_path / "rded", real_train=_grey_data())
    assert out.method == "rded" and out.images.shape == (2 * ipc, 1, 8, 8)
    assert out.labels.tolist() == [0, 0, 1, 1] and out.slots.tolist() == [0, 1, 0, 1]
    pixels = out.uint8_images(GREY)
    for t in range(ipc):
        img = pixels[t, 0].int()
        if factor == 1:
            assert torch.all(img == VALUES[rank[t]]), (t, img.unique())
        else:
            tiles = [img[:4, :4], img[:4, 4:], img[4:, :4], img[4:, 4:]]
            for k, tile in enumerate(tiles):
                assert torch.all(tile == VALUES[rank[k * ipc + t]]), (t, k, tile.unique())
    # single teacher: the first teacher's ranking
    single = recover(teachers, [None, None], GREY, dataclasses.replace(config, syn_single_teacher=True),
                     output_dir=tmp_path / "single", real_train=_grey_data())
    assert int(single.uint8_images(GREY)[0, 0, 0, 0]) == VALUES[_expected_rank(teachers[:1])[0]]


def test_rded_is_deterministic_and_starts_synthesis(tmp_path):
    """Same seed, same images; syn_init: rded with 0 iterations ships exactly the rded selection;
    rded tells the caller how many real images per class it reads."""
    images, labels = digits_uint8()
    teachers = make_teachers(2, epochs=1)
    cfg = method_config("rded", ipc=2, syn_rded_candidates=12, syn_seed=5)
    a = recover(teachers, [None, None], SPEC, cfg, output_dir=tmp_path / "a", real_train=(images, labels))
    b = recover(teachers, [None, None], SPEC, cfg, output_dir=tmp_path / "b", real_train=(images, labels))
    assert torch.equal(a.images, b.images)
    assert get_method("rded").real_per_class(cfg) == 12 and get_method("random_real").real_per_class(cfg) == 2
    c = recover(teachers, [None, None], SPEC, dataclasses.replace(cfg, syn_seed=6), output_dir=tmp_path / "c",
                real_train=(images, labels))
    assert not torch.equal(a.images, c.images)
    init = recover(teachers, [None, None], SPEC,
                   small_args(ipc=2, syn_iterations=0, syn_init="rded", syn_rded_candidates=12, syn_seed=5,
                              syn_r_conv=0.0, syn_classes_per_batch=3, syn_slots_per_batch=1),
                   stats_args=STATS_ARGS, output_dir=tmp_path / "init", real_train=(images, labels))
    assert torch.equal(init.uint8_images(SPEC), a.uint8_images(SPEC))
    torch.testing.assert_close(init.images, a.images, rtol=0, atol=1e-6)
    with pytest.raises(GVBSMError, match="syn_rded_candidates"):
        recover(teachers, [None, None], SPEC, dataclasses.replace(cfg, syn_rded_candidates=3),
                output_dir=tmp_path / "few", real_train=(images, labels))


GROUPS = [[10, 20, 30], [120, 130, 140], [230, 240, 250]]  # class-0 grey levels: three separated groups


def _grouped_data():
    vals = [v for g in GROUPS for v in g]
    x0 = torch.tensor(vals, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    x1 = torch.full((6, 1, 8, 8), 100, dtype=torch.uint8)  # class 1: identical images (degenerate k-means)
    return torch.cat([x0, x1]), torch.tensor([0] * len(vals) + [1] * 6), vals


@pytest.mark.parametrize("mode", ["cluster_lowest_ce", "cluster_centroid", "lowest_ce", "boundary"])
def test_rded_clustered_selection_keeps_one_crop_per_cluster(tmp_path, mode):
    """With the logits 2 m (m = the normalised grey level), the ensemble-logit clusters of class 0 are the
    three grey groups: ``cluster_lowest_ce`` keeps each group's brightest image (lowest CE), ``cluster_centroid``
    its middle one (the member nearest the group's mean logit), ``lowest_ce`` the three brightest overall,
    ``boundary`` the three darkest the teacher still calls class 0 (m > 0: grey > 127.5);
    kept crops ranked by increasing CE. Class 1 (six identical images) still gets its ``ipc`` images."""
    images, labels, vals = _grouped_data()
    teachers = [_Poly(2.0, 0.0)]
    config = method_config("rded", ipc=3, syn_rded_factor=1, syn_rded_candidates=len(vals), syn_seed=1,
                           syn_rded_selection=mode)
    out = recover(teachers, [None], GREY, config, output_dir=tmp_path / mode, real_train=(images, labels))
    pixels = out.uint8_images(GREY)
    kept = [int(pixels[t, 0, 0, 0]) for t in range(3)]
    expected = {"cluster_lowest_ce": [g[-1] for g in GROUPS], "cluster_centroid": [g[1] for g in GROUPS],
                "lowest_ce": sorted(vals)[-3:], "boundary": [130, 140, 230]}[mode]
    assert kept == sorted(expected, reverse=True)  # brighter = lower CE = ranked first
    assert torch.all(pixels[3:, 0] == 100)
    assert out.config["selection"] == mode


class _MeanLinear(nn.Module):
    """Penultimate feature ``m`` (the view's mean), head ``nn.Linear(1, 2)`` giving the logits ``(2 m, 0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[2.0], [0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_rded_kcenter_covers_the_class_in_feature_space(tmp_path):
    """Class 0's candidates the teacher classifies as 0 are the grey levels 130, 140, 230, 240, 250 (feature
    m > 0); k-center starts from the brightest (lowest CE), adds the farthest (130), then the one farthest
    from both (230: 20 away, against 10 for 140 and 240), where ``lowest_ce`` keeps 250, 240, 230."""
    images, labels, vals = _grouped_data()
    config = method_config("rded", ipc=3, syn_rded_factor=1, syn_rded_candidates=len(vals), syn_seed=1,
                           syn_rded_selection="kcenter")
    out = recover([_MeanLinear()], [None], GREY, config, output_dir=tmp_path / "kc", real_train=(images, labels))
    pixels = out.uint8_images(GREY)
    assert [int(pixels[t, 0, 0, 0]) for t in range(3)] == [250, 230, 130]
    assert torch.all(pixels[3:, 0] == 100)
    assert out.config["selection"] == "kcenter"
    with pytest.raises(GVBSMError, match="last nn.Linear"):
        recover([_Poly(2.0, 0.0)], [None], GREY, config, output_dir=tmp_path / "poly", real_train=(images, labels))


def _kcenter_reference(ce, correct, feats, k):
    """select_kcenter written from docs/method.md's rule, float64, brute force."""
    order = sorted(range(len(ce)), key=lambda i: (float(ce[i]), i))
    pool = [i for i in order if correct[i]]
    chosen = pool[:1]
    while pool and len(chosen) < min(k, len(pool)):
        gap = {i: min(float(torch.linalg.vector_norm(feats[i] - feats[j])) for j in chosen)
               for i in pool if i not in chosen}
        best = max(gap.values())
        chosen.append(min(i for i, v in gap.items() if v == best))
    chosen += [i for i in order if not correct[i]][:k - len(chosen)]
    return sorted(chosen, key=lambda i: (float(ce[i]), i))


def _random_candidates(g: torch.Generator, n: int, dim: int, label: int):
    """Random ``(ce, logits over 3 classes, float64 features, correct-for-label list)`` of ``n`` candidates."""
    ce = torch.rand(n, generator=g)
    logits = torch.randn(n, 3, generator=g)
    feats = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return ce, logits, feats, (logits.argmax(1) == label).tolist()


def test_select_kcenter_matches_the_farthest_point_rule():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        k = [1, 4, 9, 25][trial % 4]
        ce, logits, feats, correct = _random_candidates(g, 30, 5, 1)
        assert select_kcenter(ce, logits, feats, 1, k).tolist() == _kcenter_reference(ce, correct, feats, k)
    # fewer correct candidates than k: all of them, then the misclassified of lowest CE
    ce = torch.tensor([0.9, 0.1, 0.5, 0.3])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert select_kcenter(ce, logits, torch.eye(4, dtype=torch.float64), 0, 3).tolist() == [1, 2, 0]
    # identical features: distinct candidates all the same, lowest CE first then by index
    same = torch.zeros(4, 2, dtype=torch.float64)
    assert select_kcenter(ce, logits, same, 1, 2).tolist() == [1, 3]
    assert select_kcenter(torch.tensor([0.5, 0.1, 0.3]), torch.zeros(3, 2), torch.zeros(3, 1), 0, 3).tolist() == [1, 2, 0]


def _facility_location_reference(ce, correct, feats, k):
    """select_facility_location written from docs/method.md's objective, float64, brute force: each pick
    maximises F(S + {j}) = sum_i max_{s in S + {j}} (d0 - ||phi_i - phi_s||) over ALL candidates i."""
    n = len(ce)
    order = sorted(range(n), key=lambda i: (float(ce[i]), i))
    pool = [i for i in range(n) if correct[i]]
    dist = [[float(torch.linalg.vector_norm(feats[i] - feats[j])) for j in range(n)] for i in range(n)]
    d0 = max((dist[i][j] for i in range(n) for j in pool), default=0.0)

    def objective(chosen):
        return sum(max([0.0] + [d0 - dist[i][s] for s in chosen]) for i in range(n))

    chosen = []
    while pool and len(chosen) < min(k, len(pool)):
        values = {j: objective(chosen + [j]) for j in pool if j not in chosen}
        best = max(values.values())
        chosen.append(min(j for j, v in values.items() if abs(v - best) <= 1e-9 * max(1.0, abs(best))))
    chosen += [i for i in order if not correct[i]][:k - len(chosen)]
    return sorted(chosen, key=lambda i: (float(ce[i]), i))


def test_select_facility_location_matches_the_greedy_objective():
    g = torch.Generator().manual_seed(5)
    for trial in range(12):
        k = [1, 3, 7, 20][trial % 4]
        ce, logits, feats, correct = _random_candidates(g, 24, 4, 2)
        got = select_facility_location(ce, logits, feats, 2, k).tolist()
        assert got == _facility_location_reference(ce, correct, feats, k)
        assert len(set(got)) == min(k, 24)
    # average coverage, not the farthest point: on a line with a dense cluster at 0 and one outlier at 10,
    # the first pick is the cluster's medoid and the outlier comes second (k-center would take it first
    # from the lowest-CE start, then the far end of the cluster)
    feats = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4], [10.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, 1.0]] * 6)
    ce = torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert select_facility_location(ce, logits, feats, 1, 1).tolist() == [2]
    assert select_facility_location(ce, logits, feats, 1, 2).tolist() == [5, 2]
    # coverage counts the misclassified candidates too, which are never picked before the correct ones
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    feats = torch.tensor([[0.0], [5.0], [4.0], [6.0]], dtype=torch.float64)
    assert select_facility_location(torch.tensor([0.1, 0.2, 0.3, 0.4]), logits, feats, 1, 1).tolist() == [1]
    assert select_facility_location(torch.tensor([0.1, 0.2, 0.3, 0.4]), logits, feats, 1, 3).tolist() == [0, 1, 2]
    # identical features: every gain ties, distinct candidates by index, ranked by CE
    same = torch.zeros(4, 2, dtype=torch.float64)
    logits = torch.tensor([[0.0, 1.0]] * 4)
    assert select_facility_location(torch.tensor([0.9, 0.1, 0.5, 0.3]), logits, same, 1, 3).tolist() == [1, 2, 0]


def test_rded_facility_location_through_recover(tmp_path):
    """Grey levels of class 0 classified 0 (m > 0): 130, 140, 230, 240, 250. Covering EVERY class-0
    candidate (the darker, misclassified ones too) the medoid 130 comes first, then 240, the middle of
    the bright group (k-center, from the brightest, keeps 250 and 130); ranked by brightness (CE)."""
    images, labels, vals = _grouped_data()
    config = method_config("rded", ipc=2, syn_rded_factor=1, syn_rded_candidates=len(vals), syn_seed=1,
                           syn_rded_selection="facility_location")
    out = recover([_MeanLinear()], [None], GREY, config, output_dir=tmp_path / "fl", real_train=(images, labels))
    pixels = out.uint8_images(GREY)
    kept = [int(pixels[t, 0, 0, 0]) for t in range(2)]
    m = torch.tensor([2 * v / 255 - 1 for v in vals], dtype=torch.float64).unsqueeze(1)
    logits = torch.cat([2 * m, torch.zeros_like(m)], 1)
    ce = F.cross_entropy(logits, torch.zeros(len(vals), dtype=torch.long), reduction="none")
    assert [vals[i] for i in _facility_location_reference(ce, (logits.argmax(1) == 0).tolist(), m, 2)] == [240, 130]
    assert kept == [240, 130]
    assert torch.all(pixels[2:, 0] == 100)
    assert out.config["selection"] == "facility_location"


def test_teacher_features_read_the_last_linear_input_and_combine_per_teacher():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 2)),
            nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 2))]
    views = torch.randn(300, 1, 4, 4)  # more than SCORE_BATCH: two batches
    feats = teacher_features(nets, views)
    for net, f in zip(nets, feats):
        x = views.flatten(1).double()
        w, b = net[1].weight.double(), net[1].bias.double()
        ref = (x @ w.T + b).relu() if isinstance(net[2], nn.ReLU) else (x @ w.T + b).tanh()
        torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-6)
        assert f.dtype == torch.float64 and not net[3]._forward_pre_hooks  # hook removed
    both = combine_features(feats)
    assert both.shape == (300, 8)
    for block in (both[:, :5], both[:, 5:]):
        torch.testing.assert_close(block.norm(dim=1).mean(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(both[:, :5] / both[0, :5].norm(), feats[0] / feats[0][0].norm())


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    pts = torch.cat([c + 0.3 * torch.randn(15, 2, generator=g, dtype=torch.float64) for c in centres])
    truth = torch.arange(4).repeat_interleave(15)
    for seed in range(5):
        assign, found = kmeans(pts, 4, torch.Generator().manual_seed(seed))
        # the partition equals the truth up to relabelling, and each centre is its cluster's float64 mean
        for j in range(4):
            members = assign == j
            assert members.sum() == 15 and len(truth[members].unique()) == 1
            torch.testing.assert_close(found[j], pts[members].mean(0), rtol=0, atol=1e-12)
    a = kmeans(pts.float(), 3, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, kmeans(pts.float(), 3, torch.Generator().manual_seed(7))[0])
    with pytest.raises(GVBSMError, match="k-means"):
        kmeans(pts, 61, g)
    # boundary: the hardest correctly classified first, then the easiest misclassified
    ce = torch.tensor([0.1, 0.5, 0.9, 2.0, 1.5])
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert select_boundary(ce, logits, 0, 2).tolist() == [1, 2]
    assert select_boundary(ce, logits, 0, 4).tolist() == [0, 1, 2, 4]
    assert select_boundary(ce, logits, 1, 3).tolist() == [0, 4, 3]
    with pytest.raises(RecipeError, match="syn_rded_selection"):
        SynthesisArguments(syn_method="rded", method_args={"rded": {"syn_rded_selection": "typical"}})
    for rule in ("kcenter", "facility_location"):  # choices
        SynthesisArguments(syn_method="rded", method_args={"rded": {"syn_rded_selection": rule}})
    with pytest.raises(GVBSMError, match="syn_rded_selection='typical'"):
        select_clustered(torch.zeros(4), torch.zeros(4, 2), 2, "typical", torch.Generator())


# ---------------------------------------------------------------------------- per-class statistics


def _tiny_net() -> nn.Module:
    torch.manual_seed(3)
    net = create_backbone("convnet", num_classes=10, in_chans=1, image_size=16, width=6, depth=2)
    for m in net.modules():  # non-trivial running statistics: BN inputs are not what BN normalises to
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _reference_class_stats(net, x, labels, patch: int, mode: str):
    """float64 per-class statistics of every BN input and Conv2d input, written from the definitions."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Conv2d)):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: acts.__setitem__(name, inp[0].detach().double())))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    bn, conv = {}, {}
    for name, m in net.named_modules():
        if name not in acts:
            continue
        a = acts[name]
        per = {"mean": [], "var": [], "patch_mean": [], "patch_var": []}
        for c in range(10):
            ac = a[labels == c]
            per["mean"].append(ac.mean(dim=(0, 2, 3)))
            per["var"].append(ac.var(dim=(0, 2, 3), unbiased=False))
            if isinstance(m, nn.Conv2d):
                h, w = ac.shape[-2:]
                if mode == "resize" and (h % patch or w % patch):
                    ac = F.interpolate(ac, size=(-(-h // patch) * patch, -(-w // patch) * patch), mode="bilinear",
                                       align_corners=False)
                    h, w = ac.shape[-2:]
                gh, gw = -(-h // patch), -(-w // patch)
                pm, pv = torch.zeros(gh, gw, dtype=torch.float64), torch.zeros(gh, gw, dtype=torch.float64)
                for i in range(gh):
                    for j in range(gw):
                        cell = ac[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
                        pm[i, j], pv[i, j] = cell.mean(), cell.var(unbiased=False)
                per["patch_mean"].append(pm)
                per["patch_var"].append(pv)
        if isinstance(m, nn.BatchNorm2d):
            bn[name] = {"mean": torch.stack(per["mean"]), "var": torch.stack(per["var"])}
        else:
            conv[name] = {"channel_mean": torch.stack(per["mean"]), "channel_var": torch.stack(per["var"]),
                          "patch_mean": torch.stack(per["patch_mean"]), "patch_var": torch.stack(per["patch_var"])}
    return bn, conv


@pytest.mark.parametrize("mode", ["partial", "resize"])
def test_per_class_statistics_equal_a_float64_computation(tmp_path, mode):
    """Three uneven batches (so per-batch class counts differ, some are 0): the recorded per-class
    BN-input and Conv statistics equal the float64 statistics of each class's images; the global
    statistics are bit-identical to a pass without per_class; the file round-trips and an old-style
    file still loads."""
    images, labels = digits_uint8()
    images, labels = images[:160], labels[:160]
    net = _tiny_net()
    batches = [(images[a:b], labels[a:b]) for a, b in ((0, 50), (50, 120), (120, 160))]
    kw = dict(stats_patch_size=3, stats_conv_target="input", stats_augment="none", stats_patch_mode=mode)
    got = record_statistics(net, batches, SPEC, StatisticsArguments(stats_per_class=True, **kw))
    plain = record_statistics(net, batches, SPEC, StatisticsArguments(**kw))
    assert got.per_class and not plain.per_class
    for name in plain.layers:
        for key, value in plain.layers[name].items():
            assert torch.equal(got.layers[name][key], value), (name, key)
    ref_bn, ref_conv = _reference_class_stats(net, SPEC.normalize(images), labels, 3, mode)
    assert torch.equal(got.class_counts, torch.bincount(labels, minlength=10).float())
    assert list(got.class_bn) == list(ref_bn) and list(got.class_conv) == list(ref_conv)
    for got_layers, ref_layers in ((got.class_bn, ref_bn), (got.class_conv, ref_conv)):
        for name, ref in ref_layers.items():
            for key, value in ref.items():
                torch.testing.assert_close(got_layers[name][key].double(), value, rtol=1e-4, atol=2e-5,
                                           msg=f"{name} {key}")
    path = save_statistics(got, tmp_path / "t.safetensors")
    back = load_statistics(path, expect_per_class=True)
    for kind in ("class_bn", "class_conv"):
        for name, st in getattr(got, kind).items():
            for key, value in st.items():
                assert torch.equal(getattr(back, kind)[name][key], value)
    assert list(back.class_bn) == list(got.class_bn)
    old = load_statistics(save_statistics(plain, tmp_path / "old.safetensors"))
    assert not old.per_class and old.class_bn is None
    with pytest.raises(StatisticsMismatchError, match="stats_per_class"):
        load_statistics(tmp_path / "old.safetensors", expect_per_class=True)


class _ThreadAccelerator:
    """Two 'processes' as threads: ``reduce(sum)`` returns the sum of both threads' tensors."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.process_index, self.num_processes, self.shared = rank, 2, shared
        self.device, self.is_local_main_process = torch.device("cpu"), rank == 0

    def reduce(self, t, reduction="sum"):
        assert reduction == "sum"
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.process_index] = t.clone()
        barrier.wait()
        out = slots[0] + slots[1]
        barrier.wait()
        return out


def test_per_class_statistics_of_two_processes_equal_one(tmp_path):
    """The per-class merge across processes (pooled means, then M2 + n (mean - pooled)^2) gives the
    statistics of one process over all batches."""
    import threading

    images, labels = digits_uint8()
    net = _tiny_net()
    batches = [(images[a:b], labels[a:b]) for a, b in ((0, 30), (30, 100), (100, 130), (130, 220))]
    kw = dict(args=StatisticsArguments(stats_patch_size=3, stats_conv_target="input", stats_augment="none",
                                       stats_patch_mode="partial", stats_per_class=True))
    one = record_statistics(net, batches, SPEC, **kw)
    shared = {"barrier": threading.Barrier(2, timeout=60), "slots": [None, None]}
    results = [None, None]

    nets = [copy.deepcopy(net), copy.deepcopy(net)]  # one model per 'process' (hooks are per model)

    def run(rank):
        results[rank] = record_statistics(nets[rank], batches[rank::2], SPEC,
                                          accelerator=_ThreadAccelerator(rank, shared), **kw)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert torch.equal(got.class_counts, one.class_counts)
        for kind in ("class_bn", "class_conv"):
            for name, st in getattr(one, kind).items():
                for key, value in st.items():
                    torch.testing.assert_close(getattr(got, kind)[name][key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ soft category-aware loss


@pytest.fixture(scope="module")
def class_setup():
    images, labels = digits_uint8()
    teachers = make_teachers(2, epochs=1)
    batches = list(zip(images[:400].split(100), labels[:400].split(100)))
    stats = [record_statistics(t, batches, SPEC, StatisticsArguments(
        stats_patch_size=4, stats_conv_target="input", stats_augment="authors", stats_patch_mode="resize",
        stats_per_class=True)) for t in teachers]
    return teachers, stats


def _step(slot, config, x, labels):
    slot.hooks.clear()
    logits = slot.model(x)
    return SynthesisStep(config=config, x=x, logits=logits, labels=labels, teacher=slot, state={},
                         generator=torch.Generator().manual_seed(0), iteration=0)


def test_mixed_loss_with_w_1_is_the_global_loss_and_w_mixes_per_class_terms(class_setup):
    """On one batch of a 3-class job: w = 1 gives the global loss bit for bit (although the hooks compute
    per-class statistics), and w = 0.4 gives 0.4 global + 0.6 per-class BN and Conv terms, the per-class
    terms equal to a float64 reference written here (alpha = 0: plain distances, mean over classes)."""
    from contextlib import ExitStack

    teachers, stats = class_setup
    images, _ = digits_uint8()
    classes, spb = (2, 5, 7), 3
    labels = torch.tensor([c for c in classes for _ in range(spb)])
    x = SPEC.normalize(images[:len(labels)]).requires_grad_(True)
    base = method_config("gvbsm", small_args(syn_alpha=0.0, syn_beta_dr=0.0, syn_dd=False))
    mixed = dataclasses.replace(base, syn_class_weight=0.4)
    with ExitStack() as stack:
        slot = TeacherSlot(teachers[0], stats[0], mixed, STATS_ARGS, torch.device("cpu"), stack)
        slot.set_job_classes(classes, spb)
        ref_loss, ref_c = matching_loss(_step(slot, base, x, labels))
        w1_loss, w1_c = matching_loss(_step(slot, dataclasses.replace(base, syn_class_weight=1.0), x, labels))
        assert slot.hooks.bn_class_stats  # per-class statistics were there to be (mis)used
        assert torch.equal(w1_loss, ref_loss) and set(w1_c) == {"ce", "bn", "conv", "dd"}
        step = _step(slot, mixed, x, labels)
        loss, comps = matching_loss(step)
        # float64 per-class reference on the same forward: BN inputs and Conv inputs of the batch
        acts = {}
        handles = [m.register_forward_hook(lambda mod, inp, out, n=n: acts.__setitem__(n, inp[0].detach().double()))
                   for n, m in slot.model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))]
        slot.hooks.enabled = False
        with torch.no_grad():
            slot.model(x)
        slot.hooks.enabled = True
        for h in handles:
            h.remove()
        local = torch.arange(3).repeat_interleave(spb)
        rows = torch.tensor(classes)

        def per_class_dist(stat_fn, target):
            return float(np.mean([float(torch.linalg.vector_norm(stat_fn(k) - target[rows[k]].double()))
                                  for k in range(3)]))

        bn_ref = 0.0
        bn_w = slot.layer_weights("bn", 1.0)
        for name in slot.hooks.bn_layers:
            a = acts[name]
            t = stats[0].class_bn[name]
            bn_ref += bn_w[name] * (per_class_dist(lambda k: a[local == k].mean(dim=(0, 2, 3)), t["mean"])
                                    + per_class_dist(lambda k: a[local == k].var(dim=(0, 2, 3), unbiased=False), t["var"]))
        conv_ref = 0.0
        conv_w = slot.layer_weights("conv", base.syn_first_layer_multiplier)
        for name in slot.hooks.conv_layers:
            a = acts[name]
            t = stats[0].class_conv[name]
            conv_ref += conv_w[name] * (
                per_class_dist(lambda k: a[local == k].mean(dim=(0, 2, 3)), t["channel_mean"])
                + per_class_dist(lambda k: a[local == k].var(dim=(0, 2, 3), unbiased=False), t["channel_var"])
                + per_class_dist(lambda k: _patch_ref(a[local == k], 4)[0], t["patch_mean"])
                + per_class_dist(lambda k: _patch_ref(a[local == k], 4)[1], t["patch_var"]))
        assert comps["bn_class"].item() == pytest.approx(bn_ref, rel=1e-4)
        assert comps["conv_class"].item() == pytest.approx(conv_ref, rel=1e-4)
        assert comps["bn"].item() == pytest.approx(0.4 * ref_c["bn"].item() + 0.6 * bn_ref, rel=1e-4)
        assert comps["conv"].item() == pytest.approx(0.4 * ref_c["conv"].item() + 0.6 * conv_ref, rel=1e-4)
        want = base.syn_ce_weight * ref_c["ce"] + base.syn_r_bn * comps["bn"] + base.syn_r_conv * comps["conv"]
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _patch_ref(a: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 patch mean / variance (resize mode, as recorded) of (n, C, H, W)."""
    h, w = a.shape[-2:]
    if h % p or w % p:
        a = F.interpolate(a, size=(-(-h // p) * p, -(-w // p) * p), mode="bilinear", align_corners=False)
    n, c, h, w = a.shape
    cells = a.reshape(n, c, h // p, p, w // p, p).permute(2, 4, 0, 1, 3, 5).reshape(h // p, w // p, -1)
    return cells.mean(-1), cells.var(-1, unbiased=False)


def test_class_weight_in_recover(tmp_path, class_setup):
    """syn_class_weight 1 reproduces today's images from the same statistics; < 1 changes them, logs the
    per-class terms, and needs per-class statistics (the error names the fix)."""
    teachers, stats = class_setup
    globals_only = [dataclasses.replace(s, class_bn=None, class_conv=None, class_counts=None) for s in stats]
    a = recover(teachers, globals_only, SPEC, small_args(), stats_args=STATS_ARGS, output_dir=tmp_path / "a")
    b = recover(teachers, stats, SPEC, small_args(syn_class_weight=1.0), stats_args=STATS_ARGS, output_dir=tmp_path / "b")
    assert torch.equal(a.images, b.images)
    c = recover(teachers, stats, SPEC, small_args(syn_class_weight=0.5), stats_args=STATS_ARGS, output_dir=tmp_path / "c")
    assert not torch.equal(a.images, c.images) and torch.isfinite(c.images).all()
    assert "bn_class" in (tmp_path / "c" / "jobs" / "job_00000.log.jsonl").read_text()
    # killed and resumed: the per-class EMAs are checkpointed with the rest
    assert recover(teachers, stats, SPEC, small_args(syn_class_weight=0.5), stats_args=STATS_ARGS,
                   output_dir=tmp_path / "k", stop_after_iterations=6) is None
    k = recover(teachers, stats, SPEC, small_args(syn_class_weight=0.5), stats_args=STATS_ARGS, output_dir=tmp_path / "k")
    assert torch.equal(k.images, c.images)
    with pytest.raises(StatisticsMismatchError, match="stats_per_class"):
        recover(teachers, globals_only, SPEC, small_args(syn_class_weight=0.5), stats_args=STATS_ARGS,
                output_dir=tmp_path / "d")
    with pytest.raises(RecipeError, match="syn_class_weight"):
        SynthesisArguments(method_args={"gvbsm": {"syn_class_weight": 1.5}})
    with pytest.raises(GVBSMError, match="syn_class_weight"):
        SynthesisArguments(syn_method="random_real", method_args={"random_real": {"syn_class_weight": 0.5}})


# ------------------------------------------------------------------------------ student options

TSPEC = DatasetSpec(name="digits-test", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,))


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10))


def _targs(tmp_path, **kw) -> GVBSMTrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=10, per_device_eval_batch_size=100,
                learning_rate=5e-2, num_train_epochs=1, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                use_cpu=True, loss_type="ce", eval_seeds=[0], student_ema_decay=0.7)
    base.update(kw)
    return GVBSMTrainingArguments(**base)


def _datasets():
    x, y = digits_uint8()
    return SyntheticImageDataset(x[:60], y[:60], TSPEC), RealImageDataset(x[1500:1600], y[1500:1600], TSPEC)


class _Weights(TrainerCallback):
    """The student's state after every optimizer step (on_step_end runs before the EMA's update)."""

    def __init__(self):
        self.states = []

    def _snap(self, model):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._snap(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self._snap(model)


def test_student_ema_follows_the_formula_and_is_evaluated(tmp_path):
    train, val = _datasets()
    rec = _Weights()
    trainer = GVBSMTrainer(model=_student(), args=_targs(tmp_path / "a", num_train_epochs=2), train_dataset=train,
                           eval_dataset=val, spec=TSPEC, callbacks=[rec])
    trainer.train()
    assert len(rec.states) == 1 + 12  # initial weights + 2 epochs x 6 steps
    d = 0.7
    ema = {k: v.double() for k, v in rec.states[0].items()}
    for w in rec.states[1:]:
        ema = {k: (d * e + (1 - d) * w[k].double()) if w[k].is_floating_point() else w[k].double()
               for k, e in ema.items()}
    shadow = trainer.student_ema.shadow
    assert set(shadow) == set(ema) and "2.running_mean" in shadow and "2.num_batches_tracked" in shadow
    for k, v in ema.items():
        torch.testing.assert_close(shadow[k].double(), v, rtol=0, atol=1e-6, msg=k)
    assert not torch.allclose(shadow["1.weight"], rec.states[-1]["1.weight"])
    # evaluate runs on the EMA weights and leaves the trained weights in place, bit for bit
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    got = trainer.evaluate()["eval_top1"]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    ema_model = _student().eval()
    ema_model.load_state_dict({k: v.to(trained[k].dtype) for k, v in shadow.items()})
    with torch.no_grad():
        pred = ema_model(torch.stack([val[i]["pixel_values"] for i in range(len(val))])).argmax(1)
    assert got == pytest.approx(100.0 * (pred == val.labels).double().mean().item())


def test_student_ema_is_restored_when_resuming(tmp_path):
    train, val = _datasets()
    full = GVBSMTrainer(model=_student(), args=_targs(tmp_path / "full", num_train_epochs=2), train_dataset=train,
                        eval_dataset=val, spec=TSPEC)
    full.train()
    args = _targs(tmp_path / "ckpt", num_train_epochs=2, save_strategy="steps", save_steps=4)
    GVBSMTrainer(model=_student(), args=args, train_dataset=train, eval_dataset=val, spec=TSPEC).train()
    assert (tmp_path / "ckpt" / "checkpoint-4" / "gvbsm_student_ema.safetensors").is_file()
    resumed = GVBSMTrainer(model=_student(), args=args, train_dataset=train, eval_dataset=val, spec=TSPEC)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-4"))
    for k, v in full.student_ema.shadow.items():
        assert torch.equal(resumed.student_ema.shadow[k], v), k


@pytest.mark.parametrize("zeta, warmup", [(2.0, 0), (3.0, 3), (1.0, 0)])
def test_smoothing_schedule_lr_equals_the_formula(tmp_path, zeta, warmup):
    train, val = _datasets()
    args = _targs(tmp_path, student_ema_decay=None, student_lr_smoothing=zeta, warmup_steps=warmup,
                  learning_rate=0.2)
    trainer = GVBSMTrainer(model=_student(), args=args, train_dataset=train, eval_dataset=val, spec=TSPEC)
    total = 20
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    for t, lr in enumerate(lrs):
        want = 0.2 * t / warmup if t < warmup else \
            0.2 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (zeta * (total - warmup))))
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), t
    if zeta > 1:
        assert lrs[-1] > 0.05  # the period is longer than the run: the lr never reaches 0
    plain = GVBSMTrainer(model=_student(), args=_targs(tmp_path / "p", student_ema_decay=None), train_dataset=train,
                         eval_dataset=val, spec=TSPEC)
    plain.create_optimizer_and_scheduler(num_training_steps=total)
    assert plain.student_ema is None
    assert plain.lr_scheduler.get_last_lr()[0] == 5e-2  # lr_scheduler_type="constant" untouched
    with pytest.raises(RecipeError, match="student_lr_smoothing"):
        _targs(tmp_path, student_lr_smoothing=0.5)
    with pytest.raises(RecipeError, match="student_ema_decay"):
        _targs(tmp_path, student_ema_decay=1.0)


# --------------------------------------------------------------------------------------- scores


def _row(method, labels, per_seed, seeds=(0, 1, 2), evaluator="convnet128", ipc=10):
    a = np.asarray(per_seed, dtype=np.float64)
    return {"method": method, "labels": labels, "evaluator": evaluator, "ipc": ipc, "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size), "protocol": "last epoch",
            "seeds": list(seeds), "per_seed": list(per_seed)}


def test_scores_from_rows_as_documented():
    rows = [
        _row("gvbsm", "soft", [60.0, 62.5, 64.0]),
        _row("random_real", "soft", [55.0, 58.0, 57.5]),
        _row("gvbsm", "hard", [30.0, 33.0, 31.0]),
        _row("gvbsm", "stored_views", [60.0, 62.5, 64.0]),
        _row("sre2l", "soft", [50.0, 51.0], seeds=(1, 2)),
        _row("gvbsm", "soft", [70.0, 71.0, 72.0], evaluator="resnet18_cifar"),
    ]
    full = 90.0
    got = scores(rows, full_real_hard_top1=full)
    g = got["gvbsm"]["convnet128"]
    assert g["top1"]["mean"] == pytest.approx(62.166666666666664) and g["top1"]["std"] == pytest.approx(
        np.std([60.0, 62.5, 64.0], ddof=1))
    # random-subset margin: difference of the means (docs/method.md "Scores")
    assert g["random_margin"]["mean"] == pytest.approx(np.mean([60.0, 62.5, 64.0]) - np.mean([55.0, 58.0, 57.5]))
    assert g["random_margin"]["per_seed"] == pytest.approx([5.0, 4.5, 6.5])
    assert g["hard_label"]["mean"] == pytest.approx(np.mean([30.0, 33.0, 31.0]))
    # DD-Ranking LRS per seed, accuracies as fractions, lambda = 0.5, then mean / std over seeds
    lrs = []
    for soft, rnd, hard in zip([60.0, 62.5, 64.0], [55.0, 58.0, 57.5], [30.0, 33.0, 31.0]):
        hlr, ior = (full - hard) / 100, (soft - rnd) / 100
        a = 0.5 * ior - 0.5 * hlr
        lrs.append((math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1)))
    assert g["lrs"]["per_seed"] == pytest.approx(lrs, rel=1e-12)
    assert g["lrs"]["mean"] == pytest.approx(np.mean(lrs)) and g["lrs"]["std"] == pytest.approx(np.std(lrs, ddof=1))
    assert g["hlr"]["mean"] == pytest.approx(90.0 - np.mean([30.0, 33.0, 31.0]))
    assert g["ior"]["per_seed"] == pytest.approx([5.0, 4.5, 6.5])
    assert 0.0 <= g["lrs"]["mean"] <= 1.0
    assert label_robust_score(0.0, 1.0) == pytest.approx((math.exp(0.5) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert label_robust_score(1.0, -1.0, lam=0.5) == pytest.approx(0.0)
    # the random subset itself: margin 0; another evaluator has no random row; partial seeds pair up
    assert got["random_real"]["convnet128"]["random_margin"]["mean"] == 0.0
    assert got["random_real"]["convnet128"]["lrs"] is None  # no hard-label row
    assert got["gvbsm"]["resnet18_cifar"]["random_margin"] is None
    s = got["sre2l"]["convnet128"]["random_margin"]
    assert s["seeds"] == [1, 2] and s["mean"] == pytest.approx(50.5 - 57.75)
    # without the full-data number there is no LRS; one per seed is used seed by seed
    assert scores(rows)["gvbsm"]["convnet128"]["lrs"] is None
    per_seed_full = scores(rows, full_real_hard_top1={0: 90.0, 1: 91.0, 2: 89.0})["gvbsm"]["convnet128"]
    assert per_seed_full["hlr"]["per_seed"] == pytest.approx([60.0, 58.0, 58.0])
    with pytest.raises(GVBSMError, match="Two rows"):
        scores(rows + [rows[0]])


def test_printed_results_table_shows_the_margin_over_the_random_subset():
    """recipes/distill.py's table: each row minus the random subset over their common seeds, same evaluator;
    hard-label rows against the random subset's hard-label row."""
    from gvbsm_hf.pipeline import format_results_table

    rows = [
        _row("gvbsm", "soft", [60.0, 62.5, 64.0]),
        _row("random_real", "soft", [55.0, 58.0, 57.5]),
        _row("gvbsm", "hard", [30.0, 33.0, 31.0]),
        _row("random_real", "hard", [40.0, 41.0, 45.0]),
        _row("gvbsm", "stored_views", [59.0, 62.0, 63.0]),
        _row("sre2l", "soft", [50.0, 51.0], seeds=(1, 2)),
        _row("gvbsm", "soft", [70.0, 71.0, 72.0], evaluator="resnet18_cifar"),
    ]
    lines = format_results_table(rows).splitlines()
    assert "vs random subset" in lines[0]
    margin = {tuple(c.strip() for c in line.split("|")[1:4]): line.split("|")[6].strip() for line in lines[2:]}
    assert margin[("gvbsm", "soft", "convnet128")] == f"{(60 + 62.5 + 64) / 3 - (55 + 58 + 57.5) / 3:+.2f}"
    assert margin[("gvbsm", "hard", "convnet128")] == f"{(30 + 33 + 31) / 3 - (40 + 41 + 45) / 3:+.2f}"
    assert margin[("gvbsm", "stored_views", "convnet128")] == f"{(59 + 62 + 63) / 3 - (55 + 58 + 57.5) / 3:+.2f}"
    assert margin[("sre2l", "soft", "convnet128")] == f"{(50 + 51) / 2 - (58 + 57.5) / 2:+.2f}"  # seeds 1, 2 only
    assert margin[("random_real", "soft", "convnet128")] == ""
    assert margin[("gvbsm", "soft", "resnet18_cifar")] == ""  # no random row for that evaluator
