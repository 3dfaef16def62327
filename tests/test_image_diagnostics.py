"""Image diagnostics (docs/method.md "Image diagnostics", Eq. 13-17, ``gvbsm_hf.image_diagnostics``): each
measure against a float64 reference written from its formula on small hand-made tensors, the per-instance
statistics against a manual computation on a tiny ConvNet, ``diagnose`` on real against real, the recover
health check and the card's table. Seconds on a CPU, no download (scikit-learn digits)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gvbsm_hf import image_diagnostics as diag
from synthesis_setup import SPEC, digits_uint8, make_teachers


def _checkerboard(n: int = 8, c: int = 1) -> torch.Tensor:
    board = (torch.arange(n)[:, None] + torch.arange(n)[None, :]) % 2
    return (board * 255).to(torch.uint8).expand(1, c, n, n).clone()


# ------------------------------------------------------------------------------------------- pixels


def test_pixel_statistics_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 6, 7), generator=g, dtype=torch.uint8)
    mean, contrast = diag.pixel_statistics(images)
    for i in range(5):
        v = images[i].numpy().astype(np.float64).ravel() / 255.0
        assert float(mean[i]) == pytest.approx(v.sum() / v.size, rel=1e-12)
        assert float(contrast[i]) == pytest.approx(math.sqrt(((v - v.mean()) ** 2).sum() / v.size), rel=1e-12)
    # float pixels in [0, 1] are the same pixels
    torch.testing.assert_close(diag.pixel_statistics(images.double() / 255)[1], contrast)
    constant = torch.full((2, 1, 4, 4), 77, dtype=torch.uint8)
    assert diag.pixel_statistics(constant)[1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        diag.pixel_statistics(torch.full((1, 1, 2, 2), -1.5))  # normalised images are refused


def test_saturated_fraction_counts_the_extremes():
    x = torch.tensor([0, 255, 1, 254, 128, 0], dtype=torch.uint8).view(1, 1, 2, 3)
    assert diag.saturated_fraction(x) == pytest.approx(3 / 6)
    assert diag.saturated_fraction(torch.zeros(2, 1, 3, 3)) == 1.0
    assert diag.saturated_fraction(torch.ones(2, 3, 3, 3)) == 1.0
    floats = torch.tensor([0.001, 0.999, 0.5, 0.0025]).view(1, 1, 2, 2)  # 0.5/255 ~ 0.00196
    assert diag.saturated_fraction(floats) == pytest.approx(2 / 4)


def _reference_share(image: np.ndarray, cutoff: float = 0.5) -> float:
    """Explicit DFT sums in float64 (Eq. 15): power of the mean-removed channels, averaged over channels."""
    c, h, w = image.shape
    power = np.zeros((h, w))
    for ch in range(c):
        x = image[ch] - image[ch].mean()
        for u, v in itertools.product(range(h), range(w)):
            s = sum(x[a, b] * np.exp(-2j * np.pi * (u * a / h + v * b / w)) for a in range(h) for b in range(w))
            power[u, v] += abs(s) ** 2 / c
    fu = np.array([u / h if u < (h + 1) // 2 else u / h - 1 for u in range(h)])
    fv = np.array([v / w if v < (w + 1) // 2 else v / w - 1 for v in range(w)])
    high = np.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2) > cutoff * 0.5
    return float((power * high).sum() / power.sum()) if power.sum() > 1e-20 else 0.0


def test_high_frequency_share_matches_float64_reference():
    assert diag.high_frequency_share(torch.full((2, 1, 8, 8), 0.4)).tolist() == [0.0, 0.0]  # constant: 0
    assert float(diag.high_frequency_share(_checkerboard(8, 3))[0]) == pytest.approx(1.0, abs=1e-12)
    smooth = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert float(diag.high_frequency_share(smooth)[0]) < 0.2
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 2, 5, 6, generator=g, dtype=torch.float64)
    got = diag.high_frequency_share(images)
    for i in range(3):
        assert float(got[i]) == pytest.approx(_reference_share(images[i].numpy()), rel=1e-9)


# ---------------------------------------------------------------------------- per-instance statistics


def _tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                        nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_instance_statistics_match_a_manual_computation():
    net = _tiny_convnet()
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    got = diag.instance_statistics(net, x, batch_size=2)  # several chunks
    assert set(got) == {"conv:0", "bn:1", "conv:3", "bn:4"} and net.training is False
    inputs = {"conv:0": x}
    with torch.no_grad():
        inputs["bn:1"] = net[0](x)
        inputs["conv:3"] = net[2](net[1](inputs["bn:1"]))
        inputs["bn:4"] = net[3](inputs["conv:3"])
    for name, a in inputs.items():
        a = a.double().numpy()
        m = a.mean(axis=(2, 3))
        s = np.sqrt(((a - m[:, :, None, None]) ** 2).mean(axis=(2, 3)))
        np.testing.assert_allclose(got[name][0].numpy(), m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name][1].numpy(), s, rtol=1e-4, atol=1e-5)


def test_instance_statistic_distances_follow_eq_16():
    g = torch.Generator().manual_seed(3)
    real = {"a": (torch.randn(40, 3, generator=g, dtype=torch.float64),
                  torch.rand(40, 3, generator=g, dtype=torch.float64))}
    syn = {"a": (real["a"][0][:10] * 0.5 + 2.0, real["a"][1][:10])}
    got = diag.instance_statistic_distances(syn, real)
    m_real, m_syn = real["a"][0].numpy(), syn["a"][0].numpy()
    sd = m_real.std(0)
    ref = np.mean(np.abs(m_syn.mean(0) - m_real.mean(0)) / (sd + 0.1 * sd.mean() + 1e-12))
    assert got["instance_mean_distance"] == pytest.approx(ref, rel=1e-12)
    assert got["instance_mean_spread_ratio"] == pytest.approx(m_syn.std(0).sum() / sd.sum(), rel=1e-12)
    # with labels: the spread is pooled within classes (root of the mean within-class variance)
    real_labels, syn_labels = torch.arange(40) % 2, torch.arange(10) % 2
    pooled = [np.sqrt(np.mean([m[lab == c].var(0) for c in (0, 1)], axis=0))
              for m, lab in ((m_syn, syn_labels.numpy()), (m_real, real_labels.numpy()))]
    got = diag.instance_statistic_distances(syn, real, syn_labels, real_labels)
    assert got["instance_mean_spread_ratio"] == pytest.approx(pooled[0].sum() / pooled[1].sum(), rel=1e-12)
    same = diag.instance_statistic_distances(real, real)
    assert same["instance_mean_distance"] == 0.0 and same["instance_std_distance"] == 0.0
    assert same["instance_mean_spread_ratio"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ diversity


def test_within_class_diversity_is_zero_for_identical_images():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(12, 5, generator=g, dtype=torch.float64)
    real_labels = torch.arange(2).repeat_interleave(6)
    same = torch.cat([real[:1].expand(3, -1), real[6:7].expand(3, -1)])
    labels = torch.arange(2).repeat_interleave(3)
    assert diag.within_class_diversity(same, labels, real, real_labels) == 0.0
    spread = [np.mean([math.dist(a, b) for a, b in itertools.combinations(real[real_labels == c].tolist(), 2)])
              for c in range(2)]
    assert diag.within_class_diversity(real[[0, 1, 6, 7]], torch.tensor([0, 0, 1, 1]), real, real_labels) == \
        pytest.approx(np.mean([math.dist(real[0], real[1]) / spread[0], math.dist(real[6], real[7]) / spread[1]]))


# ------------------------------------------------------------------------------------------- diagnose


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_uint8()
    return images[:400], labels[:400], make_teachers(1, epochs=1)


def test_diagnose_real_against_real_is_near_zero(digits):
    images, labels, teachers = digits
    a, b = slice(0, 200), slice(200, 400)
    out = diag.diagnose(images[a], labels[a], images[b], labels[b], teachers, SPEC)
    json.dumps(out)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["instance_mean_distance"] < 0.25 and out["instance_std_distance"] < 0.25
    assert out["instance_mean_spread_ratio"] == pytest.approx(1.0, abs=0.2)
    assert out["within_class_diversity"] == pytest.approx(1.0, abs=0.15)
    for k in ("pixel_mean", "contrast", "saturated_fraction", "high_frequency_share"):
        assert out[f"{k}_syn"] == pytest.approx(out[f"{k}_real"], abs=0.03), k
    assert out["num_images_syn"] == 200.0 and out["instance_layers"] >= 2
    # a set of one image per class, repeated: no diversity, far from real
    rep = torch.cat([images[labels == c][:1].expand(3, -1, -1, -1) for c in range(10)])
    far = diag.diagnose(rep, torch.arange(10).repeat_interleave(3), images[b], labels[b], teachers, SPEC)
    assert far["within_class_diversity"] == 0.0 and far["instance_mean_spread_ratio"] < 1.0
    assert all(t.training is False for t in teachers)


def test_diagnose_keeps_only_real_images_of_the_synthetic_classes(digits):
    images, labels, teachers = digits
    two = labels < 2
    out = diag.diagnose(images[two][:10], labels[two][:10], images, labels, teachers, SPEC)
    assert out["num_images_real"] == float(int(two.sum()))
    single = diag.diagnose(images[:1], labels[:1], images, labels, teachers, SPEC)  # IPC 1: no diversity
    assert "within_class_diversity" not in single and "instance_mean_spread_ratio" not in single
    assert "contrast_syn" in single and "instance_mean_distance" in single


def test_diagnostic_rows_for_the_card():
    rows = diag.diagnostic_rows({"contrast_syn": 0.5, "contrast_real": 0.25, "within_class_diversity": 0.1})
    assert rows == [{"measure": "contrast: per-image pixel std (Eq. 13)", "synthetic": "0.500", "real": "0.250"},
                    {"measure": "within-class diversity, relative to real (Eq. 17)", "synthetic": "0.100",
                     "real": "1 (reference)"}]


# ------------------------------------------------------------------------------- health check and card


class _Acc:
    device = torch.device("cpu")
    is_main_process = True


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def _context(tmp_path, digits, dataset):
    from pathlib import Path

    from gvbsm_hf.recipe import parse_recipe
    from gvbsm_hf.stage import StageContext
    from gvbsm_hf.synthetic_set import SyntheticSet

    images, labels, _ = digits
    syn = SyntheticSet(SPEC.normalize(images[:30]), labels[:30], labels[:30] * 0, labels[:30] * 0, "gvbsm")
    smoke = Path(__file__).resolve().parents[1] / "recipes" / "digits" / "smoke.yaml"
    recipe = parse_recipe(["--config", str(smoke), "--output_dir", str(tmp_path)])
    return StageContext(recipe=recipe, accelerator=_Acc(), output_dir=tmp_path, cache=None, dataset=dataset, spec=SPEC,
                        logger=_Log(), synthetic={"gvbsm": syn})


def test_the_recover_health_check_stores_the_diagnostics(tmp_path, digits):
    import datasets

    from gvbsm_hf.recover.health import diagnostic_real_per_class
    from gvbsm_hf.recover.stage import RecoverStage
    from gvbsm_hf.synthetic_set import SyntheticSet

    images, labels, teachers = digits
    train = SyntheticSet(SPEC.normalize(images), labels, labels * 0, labels * 0, "real").to_dataset(SPEC)
    ctx = _context(tmp_path, digits, datasets.DatasetDict({"train": train}))
    RecoverStage().check_health(ctx, "gvbsm", teachers)
    health = json.loads((tmp_path / "recover" / "gvbsm" / "health.json").read_text())
    assert health == ctx.health["gvbsm"] and health["healthy"] and not ctx.logger.warnings
    d = health["diagnostics"]
    assert d["num_images_syn"] == 30.0 and d["num_images_real"] == float(min(400, 10 * diagnostic_real_per_class(10)))
    assert 0.0 <= d["high_frequency_share_syn"] <= 1.0 and "within_class_diversity" in d
    assert diagnostic_real_per_class(10) == 50 and diagnostic_real_per_class(1000) == 2
    # a failure keeps the set and its health, says why (warning) and stores the reason
    (tmp_path / "recover" / "gvbsm" / "health.json").unlink()
    ctx = _context(tmp_path, digits, None)
    RecoverStage().check_health(ctx, "gvbsm", teachers)
    health = ctx.health["gvbsm"]
    assert health["healthy"] and "diagnostics" not in health and "no indexable train split" in health["diagnostics_error"]
    assert "could not be computed" in ctx.logger.warnings[0] and "gvbsm" in ctx.synthetic


def _card(tmp_path, health):
    import datasets

    from gvbsm_hf.export.card import build_dataset_card

    from gvbsm_hf.export.layout import CONFIG_FILES

    folder = tmp_path / "export"
    table = datasets.Dataset.from_dict({"label": [0, 1]})
    path = folder / CONFIG_FILES["default"]
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(path))
    return str(build_dataset_card({"default": table}, spec=SPEC, method_name="gvbsm", ipc=2, hyperparameters={},
                                  folder=folder, health=health))


def test_the_card_shows_the_diagnostics_table(tmp_path):
    health = {"ensemble_top1": 90.0, "ensemble_ce": 0.3, "chance_ce": 2.3026, "num_classes": 10, "healthy": True,
              "diagnostics": {"contrast_syn": 0.41, "contrast_real": 0.3, "saturated_fraction_syn": 0.5,
                              "saturated_fraction_real": 0.25, "within_class_diversity": 0.2}}
    card = _card(tmp_path, health)
    assert "| measure | synthetic | real |" in card
    assert "| contrast: per-image pixel std (Eq. 13) | 0.410 | 0.300 |" in card
    assert "| within-class diversity, relative to real (Eq. 17) | 0.200 | 1 (reference) |" in card
    assert "Image diagnostics" in card
    plain = _card(tmp_path / "b", {k: v for k, v in health.items() if k != "diagnostics"})
    assert "| measure | synthetic | real |" not in plain and "90.0 %" in plain
