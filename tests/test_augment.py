"""gvbsm_hf.augment: crop/flip against float64 references, gradients, replayable parameters, CutMix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from gvbsm_hf.augment import (
    CropFlipParams,
    apply_crop_flip,
    cutmix,
    pad_crop_flip,
    random_resized_crop_flip,
    sample_crop_flip,
)
from gvbsm_hf.errors import GVBSMError


def _params(boxes, flip=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    flip = torch.zeros(len(boxes), dtype=torch.bool) if flip is None else torch.tensor(flip, dtype=torch.bool)
    return CropFlipParams(boxes, flip)


def _bilinear_reference(img: torch.Tensor, box, out_h: int, out_w: int) -> torch.Tensor:
    """float64 crop-resize written from the definition: output pixel (p, q) of a box
    (x1, y1, x2, y2) in pixel-edge coordinates covers the bin [y1 + p*bh, y1 + (p+1)*bh) x ...;
    it is the mean of bilinear samples (pixel k's centre at k + 0.5, border clamped) on a
    ceil(bh) x ceil(bw) grid of bin-centred points, bh = (y2 - y1) / out_h."""
    c, h, w = img.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    bh, bw = (y2 - y1) / out_h, (x2 - x1) / out_w
    gh, gw = math.ceil(bh), math.ceil(bw)
    out = torch.zeros(c, out_h, out_w, dtype=torch.float64)
    im = img.double()

    def sample(yc: float, xc: float) -> torch.Tensor:  # continuous coordinates -> index space
        y, x = min(max(yc - 0.5, 0.0), h - 1.0), min(max(xc - 0.5, 0.0), w - 1.0)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * im[:, y0, x0] + (1 - ly) * lx * im[:, y0, x1_]
                + ly * (1 - lx) * im[:, y1_, x0] + ly * lx * im[:, y1_, x1_])

    for p in range(out_h):
        for q in range(out_w):
            acc = torch.zeros(c, dtype=torch.float64)
            for iy in range(gh):
                for ix in range(gw):
                    acc += sample(y1 + p * bh + (iy + 0.5) * bh / gh, x1 + q * bw + (ix + 0.5) * bw / gw)
            out[:, p, q] = acc / (gh * gw)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_box_without_flip_is_identity(dtype):
    x = torch.rand(3, 2, 9, 7, dtype=dtype)
    y = apply_crop_flip(x, _params([[0, 0, 7, 9]] * 3), (9, 7))
    assert y.dtype == dtype
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_full_box_upsampling_equals_interpolate_half_pixel():
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    for size in (12, 9):
        y = apply_crop_flip(x, _params([[0, 0, 6, 6]] * 2), size)
        ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_integer_downscale_of_a_slice_is_area_average():
    x = torch.rand(1, 2, 20, 20, dtype=torch.float64)
    y = apply_crop_flip(x, _params([[3, 2, 19, 18]]), 8)  # 16x16 slice -> 8x8
    ref = F.avg_pool2d(x[:, :, 2:18, 3:19], 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "box,out", [([2.0, 3.0, 7.0, 8.0], 9), ([1.0, 0.0, 12.0, 9.0], 4), ([0.5, 1.25, 6.75, 11.0], 5)]
)
def test_known_box_matches_float64_bilinear_sampler(box, out):
    x = torch.randn(1, 2, 12, 13, dtype=torch.float64)
    y = apply_crop_flip(x, _params([box]), out)
    torch.testing.assert_close(y[0], _bilinear_reference(x[0], box, out, out), rtol=0, atol=1e-10)


def test_flip_flips_and_only_where_asked():
    x = torch.rand(2, 3, 8, 8)
    params = _params([[1, 1, 7, 7], [1, 1, 7, 7]], [True, False])
    y = apply_crop_flip(x, params, 6)
    no_flip = apply_crop_flip(x, _params([[1, 1, 7, 7], [1, 1, 7, 7]]), 6)
    torch.testing.assert_close(y[0], no_flip[0].flip(-1))
    torch.testing.assert_close(y[1], no_flip[1])
    torch.testing.assert_close(no_flip, x[:, :, 1:7, 1:7])


def test_gradients_flow_gradcheck():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = _params([[0.5, 1.0, 5.0, 4.5], [1.0, 0.0, 6.0, 5.0]], [True, False])
    assert torch.autograd.gradcheck(lambda t: apply_crop_flip(t, params, 3), (x,), eps=1e-6, atol=1e-6)


def test_bf16_input_is_computed_in_float32_and_cast_back():
    x = torch.rand(4, 3, 16, 16)
    params = sample_crop_flip(4, 16, 16, generator=torch.Generator().manual_seed(1))
    y = apply_crop_flip(x.bfloat16(), params, 12)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), apply_crop_flip(x.bfloat16().float(), params, 12), rtol=1e-2, atol=1e-2)


def test_same_seed_same_params_other_seed_other_params():
    a = sample_crop_flip(64, 32, 32, generator=torch.Generator().manual_seed(7))
    b = sample_crop_flip(64, 32, 32, generator=torch.Generator().manual_seed(7))
    c = sample_crop_flip(64, 32, 32, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.boxes, c.boxes)
    x = torch.rand(64, 1, 32, 32)
    out = random_resized_crop_flip(x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, apply_crop_flip(x, a, 32))


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 0.6)])
def test_boxes_within_bounds_area_and_ratio(scale):
    h, w, n = 24, 32, 3000
    p = sample_crop_flip(n, h, w, scale=scale, generator=torch.Generator().manual_seed(0))
    b = p.boxes.double()
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert torch.equal(b, b.round())  # integer pixel boxes, like torchvision
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (bw >= 1).all() and (bh >= 1).all()
    # w, h are rounded from a continuous (area, ratio) pair: allow half a pixel each way
    assert ((bw - 0.5) * (bh - 0.5) <= scale[1] * h * w + 1e-9).all()
    assert ((bw + 0.5) * (bh + 0.5) >= scale[0] * h * w - 1e-9).all()
    assert ((bw + 0.5) / (bh - 0.5) >= 3 / 4 - 1e-9).all() and ((bw - 0.5) / (bh + 0.5) <= 4 / 3 + 1e-9).all()
    assert 0.45 < p.flip.float().mean().item() < 0.55
    # corners are spread over the valid positions
    assert len(torch.unique(b[:, 0])) > 5 and len(torch.unique(b[:, 1])) > 5


def test_fallback_is_torchvisions_central_crop():
    # a 10x40 image cannot hold a 90 % area crop of aspect ratio <= 4/3: every try fails
    p = sample_crop_flip(20, 10, 40, scale=(0.9, 1.0), generator=torch.Generator().manual_seed(0))
    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(1, 10, 40), scale=[0.9, 1.0], ratio=[3 / 4, 4 / 3])
    expected = torch.tensor([j, i, j + w, i + h], dtype=torch.float32).expand(20, 4)
    assert torch.equal(p.boxes, expected)


def test_params_dict_round_trip_index_and_to():
    p = sample_crop_flip(6, 16, 16, generator=torch.Generator().manual_seed(3))
    q = CropFlipParams.from_dict(p.to_dict())
    assert torch.equal(p.boxes, q.boxes) and torch.equal(p.flip, q.flip) and q.flip.dtype == torch.bool
    sub = p.index(torch.tensor([4, 1]))
    assert torch.equal(sub.boxes, p.boxes[[4, 1]]) and torch.equal(sub.flip, p.flip[[4, 1]])
    assert torch.equal(p.index([2]).boxes, p.boxes[2:3])
    assert p.to("cpu").boxes.device.type == "cpu" and len(p) == 6
    with pytest.raises(GVBSMError, match="one box per image"):
        apply_crop_flip(torch.rand(5, 1, 16, 16), p, 16)


def test_pad_crop_flip_is_a_shifted_possibly_flipped_crop_of_the_padded_image():
    x = torch.rand(16, 3, 8, 8)
    out = pad_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    again = pad_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    seen = set()
    for n in range(16):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[n], (lambda c: c.flip(-1) if f else c)(padded[n, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {n} is not a crop of the padded image"
        seen.add(matches[0])
    assert len(seen) > 4  # offsets and flips vary
    u8 = (x * 255).to(torch.uint8)
    assert pad_crop_flip(u8, generator=torch.Generator().manual_seed(1)).dtype == torch.uint8


def test_pad_crop_flip_reflect_mode():
    x = torch.rand(4, 1, 6, 6)
    out = pad_crop_flip(x, padding=3, padding_mode="reflect", generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    for n in range(4):
        assert any(torch.equal(out[n], c) for dy in range(7) for dx in range(7)
                   for c in (padded[n, :, dy:dy + 6, dx:dx + 6], padded[n, :, dy:dy + 6, dx:dx + 6].flip(-1)))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lam_is_the_kept_area(seed):
    x = torch.rand(8, 3, 13, 11, requires_grad=True)
    mixed, perm, lam = cutmix(x, alpha=1.0, generator=torch.Generator().manual_seed(seed))
    assert sorted(perm.tolist()) == list(range(8))
    xd = x.detach()
    for i in range(8):
        if perm[i] == i:
            continue
        from_other = (mixed[i] == xd[perm[i]]).all(0) & (mixed[i] != xd[i]).any(0)
        kept = (mixed[i] == xd[i]).all(0)
        assert bool((from_other | kept).all())
        assert kept.double().mean().item() == pytest.approx(lam, abs=1e-12)
        rows, cols = from_other.any(1).nonzero().flatten(), from_other.any(0).nonzero().flatten()
        if len(rows):  # the pasted region is one rectangle
            assert int(from_other.sum()) == len(rows) * len(cols)
    mixed.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cutmix_is_seeded():
    x = torch.rand(5, 1, 8, 8)
    a = cutmix(x, generator=torch.Generator().manual_seed(4))
    b = cutmix(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    lams = {cutmix(x, generator=torch.Generator().manual_seed(s))[2] for s in range(10)}
    assert len(lams) > 3 and all(0.0 <= v <= 1.0 for v in lams)
