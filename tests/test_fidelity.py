"""The authors' behaviour, option by option (issue 14; docs/differences.md has one row per option).

Each test pins one difference between the authors' G-VBSM code and gvbsm-hf 0.1 and checks that
both behaviours are available and that the default is the authors'."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from synthesis_setup import SPEC, digits_uint8, make_statistics, make_teachers  # noqa: E402

from gvbsm_hf.augment_families import authors_batch_augment, recording_augment, synthesis_augment  # noqa: E402
from gvbsm_hf.recover.config import PROTOCOLS, SynthesisArguments  # noqa: E402
from gvbsm_hf.record.config import StatisticsArguments
from gvbsm_hf.errors import StatisticsMismatchError  # noqa: E402
from gvbsm_hf.moments import conv_statistics  # noqa: E402
from gvbsm_hf.losses import conv_matching_loss, data_densification_loss, sds_matching_loss  # noqa: E402
from gvbsm_hf.methods import method_config  # noqa: E402
from gvbsm_hf.record.statistics_file import load_statistics, save_statistics  # noqa: E402
from gvbsm_hf.recover.engine import recover  # noqa: E402


def _distinct_images(n: int, size: int) -> torch.Tensor:
    """Images whose every pixel value is unique, so a crop/shift can be read back from the output."""
    base = 1.0 + torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    return torch.cat([base + 100_000.0 * i for i in range(n)])


def _same_view(out: torch.Tensor) -> bool:
    """Whether every image of ``out`` is the same view of its input (zero padding included)."""
    pad = out == 0
    views = out - 100_000.0 * torch.arange(len(out)).view(-1, 1, 1, 1)
    views = torch.where(pad, torch.zeros_like(views), views)
    return bool((pad == pad[:1]).all()) and torch.allclose(views, views[:1].expand_as(views), atol=0.5)


# ---------------------------------------------------------------------- 1. synthesis augmentation

@pytest.mark.parametrize("size", [16, 32, 160])
def test_authors_augmentation_draws_once_per_batch(size):
    x = _distinct_images(6, size)
    for seed in range(5):
        out = authors_batch_augment(x, generator=torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        assert _same_view(out)  # every image got the same crop / flip / roll


def test_authors_augmentation_small_images_are_pad_crop_flip_then_roll():
    size, x = 32, _distinct_images(2, 32)
    g = torch.Generator().manual_seed(3)
    out = authors_batch_augment(x, generator=g)
    # replay the documented draws: crop offset (2 ints in 0..2p), flip, two shifts in 0..32
    g = torch.Generator().manual_seed(3)
    p = 4
    i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5)
    dh, dw = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
    ref = F.pad(x, (p, p, p, p))[..., i:i + size, j:j + size]
    ref = ref.flip(-1) if flip else ref
    assert torch.equal(out, torch.roll(ref, shifts=(dh, dw), dims=(2, 3)))


def test_per_image_augmentation_draws_independently():
    x = _distinct_images(8, 16)
    out = synthesis_augment(x, "per_image_rrc", crop_scale=(0.08, 1.0), generator=torch.Generator().manual_seed(0))
    assert not _same_view(out)
    assert torch.equal(synthesis_augment(x, "none", crop_scale=(0.08, 1.0), generator=None), x)


def test_the_default_protocol_is_the_authors():
    args = SynthesisArguments()
    for name, value in PROTOCOLS["authors"].items():
        if name.startswith("syn_"):
            assert getattr(args, name) == value, name
    old = SynthesisArguments(syn_protocol="gvbsm_hf_v0", syn_ema_init="zero")
    assert old.syn_augment == "per_image_rrc" and old.syn_first_layer == "first_bn_and_conv"
    assert old.syn_ema_init == "zero"  # an explicit value wins over the protocol
    # the fidelity fields are protocol fields: a baseline gets them too
    assert method_config("sre2l", old, baseline=True).syn_augment == "per_image_rrc"


# ---------------------------------------------------------------------- 2. recording augmentation

def test_authors_recording_augmentation_is_the_train_transform_per_image():
    x = _distinct_images(8, 32)
    out = recording_augment(x, "authors", crop_scale=(0.08, 1.0), generator=torch.Generator().manual_seed(1))
    assert not _same_view(out)  # per image
    # pad-crop + flip keeps pixel values (no resampling): every non-zero value is an input value
    values = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values


@pytest.fixture(scope="module")
def teachers_and_stats():
    torch.manual_seed(0)
    teachers = make_teachers(2, epochs=1)
    return teachers, make_statistics(teachers, augment="per_image_rrc", patch_mode="resize")


def test_statistics_of_another_augmentation_refuse_to_load(tmp_path, teachers_and_stats):
    teachers, stats = teachers_and_stats
    path = save_statistics(stats[0], tmp_path / "t0.safetensors") or tmp_path / "t0.safetensors"
    assert load_statistics(path, expect_augment="per_image_rrc").provenance["augment"] == "per_image_rrc"
    with pytest.raises(StatisticsMismatchError, match="stats_augment"):
        load_statistics(path, expect_augment="authors")
    with pytest.raises(StatisticsMismatchError, match="stats_patch_mode"):
        load_statistics(path, expect_patch_mode="partial")
    # and synthesis under the authors' augmentation refuses them, unless stats_augment says so
    args = SynthesisArguments(ipc=1, syn_iterations=1, syn_classes_per_batch=10)
    with pytest.raises(StatisticsMismatchError, match="recorded with augmentation 'per_image_rrc'"):
        recover(teachers, stats, SPEC, args, stats_args=StatisticsArguments(), output_dir=tmp_path / "r")
    out = recover(teachers, stats, SPEC, args, stats_args=StatisticsArguments(stats_augment="per_image_rrc"),
                  output_dir=tmp_path / "ok")
    assert out.images.shape == (10, 1, 16, 16)


# ---------------------------------------------------------------------- 3. first-layer multiplier

@pytest.mark.parametrize("first_layer", ["first_conv", "first_bn_and_conv"])
def test_first_layer_multiplier_lands_where_configured(tmp_path, teachers_and_stats, monkeypatch, first_layer):
    import gvbsm_hf.methods.gvbsm as gvbsm_mod

    teachers, stats = teachers_and_stats
    seen = {}
    real_build = gvbsm_mod.build_layout  # the fused matching loss takes its layer weights from its layout

    def build(*a, **k):
        seen.setdefault("bn", k["bn_weights"])
        seen.setdefault("conv", k["conv_weights"])
        return real_build(*a, **k)

    monkeypatch.setattr(gvbsm_mod, "build_layout", build)
    args = SynthesisArguments(ipc=1, syn_iterations=1, syn_classes_per_batch=10, syn_first_layer=first_layer,
                              method_args={"gvbsm": {"syn_single_teacher": True}})
    recover(teachers[:1], stats[:1], SPEC, args, stats_args=StatisticsArguments(stats_augment="per_image_rrc"),
            output_dir=tmp_path / first_layer)
    convs = [n for n, m in teachers[0].named_modules() if isinstance(m, torch.nn.Conv2d)]
    boosted_conv = [n for n, w in seen["conv"].items() if w != 1.0]
    boosted_bn = [n for n, w in seen["bn"].items() if w != 1.0]
    assert boosted_conv == [convs[0]] and seen["conv"][convs[0]] == 10.0
    assert boosted_bn == ([] if first_layer == "first_conv" else [next(iter(seen["bn"]))])


# ---------------------------------------------------------------------- 4. beta_dr per layer

def _conv_stats(layers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: {k: torch.rand(3, generator=g) for k in ("channel_mean", "channel_var", "patch_mean", "patch_var")}
    return {f"l{i}": make() for i in range(layers)}, {f"l{i}": make() for i in range(layers)}


def test_layer_wise_drop_removes_a_layers_four_statistics_together():
    stats, targets = _conv_stats(40)
    _, emas, kept = conv_matching_loss(stats, targets, None, alpha=0.5, beta_dr=0.5,
                                       generator=torch.Generator().manual_seed(0), drop="layer")
    assert 0 < kept < 160 and kept % 4 == 0
    assert all(len(v) == 4 for v in emas.values()) and len(emas) == kept // 4
    _, emas, kept = conv_matching_loss(stats, targets, None, alpha=0.5, beta_dr=0.5,
                                       generator=torch.Generator().manual_seed(0), drop="statistic")
    assert any(len(v) not in (0, 4) for v in emas.values())  # statistic-wise: layers lose single terms
    assert method_config("gvbsm", SynthesisArguments()).syn_beta_dr_unit == "layer"


# ---------------------------------------------------------------------- 5. SDS EMA initialisation

def test_zero_initialised_ema_gives_one_minus_alpha_times_the_statistic():
    cur = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    target = torch.tensor([0.5, 0.5, 0.5])
    loss, ema = sds_matching_loss(cur, target, None, 0.8, ema_init="zero")
    torch.testing.assert_close(ema, 0.2 * cur.detach())
    torch.testing.assert_close(loss, torch.linalg.vector_norm(target - 0.2 * cur.detach()))
    _, ema_first = sds_matching_loss(cur, target, None, 0.8, ema_init="first")
    torch.testing.assert_close(ema_first, cur.detach())
    # the gradient flows through the current batch with coefficient 1 in both cases
    (g,) = torch.autograd.grad(loss, cur)
    d = (0.2 * cur.detach() - target).double()
    torch.testing.assert_close(g.double(), d / d.norm())


# ---------------------------------------------------------------------- 6. resized patches

def _resize_patch_reference(x: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """float64: bilinear resize (half-pixel centres) to the next multiple of p, then per-patch mean
    and biased variance over batch, channels and the patch's pixels; channel stats on the map as is."""
    x = x.double()
    n, c, h, w = x.shape
    hh, ww = -(-h // p) * p, -(-w // p) * p

    def weights(src: int, dst: int) -> torch.Tensor:
        m = torch.zeros(dst, src, dtype=torch.float64)
        for o in range(dst):
            s = (o + 0.5) * src / dst - 0.5
            s = min(max(s, 0.0), src - 1)
            lo = int(s)
            hi = min(lo + 1, src - 1)
            m[o, lo] += 1 - (s - lo)
            m[o, hi] += s - lo
        return m

    r = torch.einsum("ah,nchw,bw->ncab", weights(h, hh), x, weights(w, ww))
    patches = r.reshape(n, c, hh // p, p, ww // p, p).permute(2, 4, 0, 1, 3, 5).reshape(hh // p, ww // p, -1)
    return {"channel_mean": x.mean(dim=(0, 2, 3)), "channel_var": x.var(dim=(0, 2, 3), unbiased=False),
            "patch_mean": patches.mean(-1), "patch_var": patches.var(-1, unbiased=False)}


@pytest.mark.parametrize("hw", [(7, 7), (14, 10), (8, 8)])
def test_resized_patch_statistics_equal_a_float64_reference(hw):
    x = torch.randn(3, 5, *hw, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    got = conv_statistics(x, 4, "resize")
    ref = _resize_patch_reference(x, 4)
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-5)
    if hw == (8, 8):  # a multiple: both modes agree
        partial = conv_statistics(x, 4, "partial")
        for k in ref:
            torch.testing.assert_close(got[k], partial[k])
    else:
        assert got["patch_mean"].shape == conv_statistics(x, 4, "partial")["patch_mean"].shape


# ---------------------------------------------------------------------- 7. DD pooling

def _dd_reference(x: torch.Tensor, labels: torch.Tensor, size: int, tau: float = 4.0) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(x.double(), size).flatten(1)
    total = torch.zeros((), dtype=torch.float64)
    for c in labels.unique():
        xc = x[labels == c]
        if len(xc) < 2:
            continue
        sigma = torch.linalg.eigvalsh(xc @ xc.T)
        p, log_q = torch.softmax(sigma / tau, -1), torch.log_softmax(sigma, -1)
        total = total + (p * (torch.log(p) - log_q)).sum()
    return total


def test_dd_always_pools_to_32_like_the_authors():
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.05
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    always = data_densification_loss(x, y, pool="always")
    torch.testing.assert_close(always.double(), _dd_reference(x, y, 32), rtol=1e-4, atol=1e-6)
    only_down = data_densification_loss(x, y, pool="downsample_only")
    torch.testing.assert_close(only_down.double(), _dd_reference(x, y, 28), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(always, only_down)


# ---------------------------------------------------------------------- 10. what is evaluated is shipped

def test_the_evaluate_stage_trains_on_the_exported_uint8_images(tmp_path, monkeypatch):
    import numpy as np

    import gvbsm_hf.evaluate.runs as trainer_mod
    from gvbsm_hf.export.engine import export_distilled_dataset
    from gvbsm_hf.export.loading import load_distilled_dataset
    from gvbsm_hf.synthetic_set import SyntheticSet

    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 1, 16, 16, generator=g)
    labels = torch.arange(10).repeat_interleave(2)
    syn = SyntheticSet(images, labels, torch.arange(20) % 2, torch.zeros(20, dtype=torch.long), "gvbsm")
    seen = {}

    def fake_evaluate(train_images, *a, **k):
        seen["images"] = train_images.clone()
        return {"per_run": [], "summary": {}}

    monkeypatch.setattr(trainer_mod, "evaluate_students", fake_evaluate)
    from gvbsm_hf.recipe import parse_recipe
    from gvbsm_hf.stages import STAGE_REGISTRY
    from gvbsm_hf.stage_cache import StageCache
    from gvbsm_hf.stage import StageContext

    recipe = parse_recipe(["--config", str(Path(__file__).parents[1] / "recipes/digits/smoke.yaml"),
                           "--output_dir", str(tmp_path), "--eval_seeds", "0"])
    ctx = StageContext(recipe=recipe, accelerator=None, output_dir=tmp_path, cache=StageCache(tmp_path, []),
                       dataset=None, spec=SPEC, logger=None, synthetic={"gvbsm": syn})
    ctx._decoded["validation"] = digits_uint8()
    STAGE_REGISTRY["evaluate"].run(ctx)
    folder = export_distilled_dataset(tmp_path / "export", images=syn.uint8_images(SPEC), labels=labels, spec=SPEC,
                                      method={"syn_method": "gvbsm"})
    ds = load_distilled_dataset(folder)
    exported = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.uint8))[None] for im in ds["image"]])
    assert torch.equal(seen["images"], SPEC.normalize(exported))
    assert not torch.equal(seen["images"], images)  # the float tensor is NOT what is trained on


@pytest.mark.parametrize("size", [16, 28, 32, 160])
def test_authors_augmentation_equals_slice_flip_roll_with_its_gradient(size):
    """The gather form (tensor draws, issue 32) gives bit for bit the values AND the pixel gradient of the
    slicing / flip / torch.roll form it replaced, for many draws (both flips, shifts beyond the side)."""
    from gvbsm_hf.augment import apply_crop_flip, sample_crop_flip, CropFlipParams

    from gvbsm_hf.augment_families import authors_pad, is_imagenet_scale

    x = torch.randn(3, 2, size, size, generator=torch.Generator().manual_seed(size))
    weight = torch.randn(3, 2, size, size, generator=torch.Generator().manual_seed(size + 1))
    for seed in range(8):
        a = x.clone().requires_grad_(True)
        out = authors_batch_augment(a, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad((out * weight).sum(), a)
        g = torch.Generator().manual_seed(seed)
        b = x.clone().requires_grad_(True)
        if is_imagenet_scale(size):
            one = sample_crop_flip(1, size, size, scale=(0.08, 1.0), generator=g)
            ref = apply_crop_flip(b, CropFlipParams(one.boxes.expand(3, 4).contiguous(),
                                                    one.flip.expand(3).contiguous()), (size, size))
        else:
            p = authors_pad(size)
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=g))
            flip = bool(torch.rand((), generator=g) < 0.5)
            ref = F.pad(b, (p, p, p, p))[..., i:i + size, j:j + size]
            ref = ref.flip(-1) if flip else ref
        dh, dw = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
        ref = torch.roll(ref, shifts=(dh, dw), dims=(2, 3))
        (ref_grad,) = torch.autograd.grad((ref * weight).sum(), b)
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad), seed
