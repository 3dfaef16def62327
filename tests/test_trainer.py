"""Student training (docs/method.md Eq. 11) with ``GVBSMTrainer`` and the evaluation protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback, default_data_collator

import gvbsm_hf.evaluate.trainer as trainer_mod
from gvbsm_hf import losses
from gvbsm_hf.augment import apply_crop_flip
from gvbsm_hf.backbones import create_backbone
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.ensemble import TeacherEnsemble
from gvbsm_hf.errors import DataValidationError, GVBSMError, UnknownBackboneError
from gvbsm_hf.evaluate.config import GVBSMTrainingArguments
from gvbsm_hf.evaluate.datasets import RealImageDataset, SyntheticImageDataset
from gvbsm_hf.evaluate.runs import evaluate_students
from gvbsm_hf.evaluate.trainer import GVBSMTrainer
from gvbsm_hf.relabel.config import RelabelArguments
from gvbsm_hf.relabel.engine import relabel_stored
from gvbsm_hf.relabel.views import ViewSampling

SPEC = DatasetSpec(name="digits-test", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,))
STUDENT_KW = {"width": 16, "depth": 2}


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits, 8 -> 16 px, uint8 (N, 1, 16, 16)."""
    from sklearn.datasets import load_digits  # an optional test dependency (the `test` extra)

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(d.target, dtype=torch.long)


def mlp_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def data():
    x, y = digits_uint8()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return {
        "train": (x[:1000], y[:1000]),
        "distilled": (x[1000:1060], y[1000:1060]),
        "val": (x[1400:1700], y[1400:1700]),
    }


@pytest.fixture(scope="module")
def teachers(data):
    """Two small teachers trained for a few hundred steps on real digits (~1 s)."""
    xs, ys = data["train"]
    xs = SPEC.normalize(xs)
    out = []
    for i, width in enumerate((8, 12)):
        torch.manual_seed(10 + i)
        t = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(4 * width, 10),
        )
        opt = torch.optim.Adam(t.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(i)
        for _ in range(150):
            idx = torch.randint(len(ys), (64,), generator=g)
            loss = F.cross_entropy(t(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(t.eval())
    return out


def make_args(tmp_path, **kw) -> GVBSMTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=128,
        learning_rate=5e-3,
        num_train_epochs=1,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
        loss_type="mse_gt",
        gamma=0.15,
        eval_seeds=[0],
    )
    base.update(kw)
    return GVBSMTrainingArguments(**base)


def a_batch(ds, n: int = 12) -> dict[str, torch.Tensor]:
    return default_data_collator([ds[i] for i in range(n)])


# ---- the loss on a batch is Eq. 11 / KL / CE of the augmented view -----------------------


def _reference_loss(loss_type, s, z, targets, args) -> torch.Tensor:
    """float64 references written from the equations (docs/method.md Eq. 11, SRe2L KL, CE)."""
    s, z = s.double(), z.double()
    k = s.shape[-1]
    y = targets.double() if targets.is_floating_point() else F.one_hot(targets, k).double()
    ce = -(y * torch.log_softmax(s, -1)).sum(-1).mean()
    if loss_type == "mse_gt":
        return ((s - z) ** 2).mean() + args.gamma * ce
    if loss_type == "kl":
        t = args.kd_temperature
        p = torch.softmax(z / t, -1)
        return (p * (torch.log(p) - torch.log_softmax(s / t, -1))).sum(-1).mean()
    return ce


@pytest.mark.parametrize("loss_type, ce_label", [("mse_gt", "original"), ("mse_gt", "mixed"), ("kl", "original"),
                                                  ("ce", "original")])
@pytest.mark.parametrize("cutmix_prob", [0.0, 1.0])
def test_loss_equals_hand_computation_on_same_view(tmp_path, data, teachers, monkeypatch, loss_type, ce_label,
                                                   cutmix_prob):
    """Under CutMix the soft label is the teachers' on the MIXED image; Eq. 11's GT term takes the
    original label (``cutmix_ce_label="original"``, authors) or the lambda-mixed one."""
    args = make_args(tmp_path, loss_type=loss_type, cutmix_prob=cutmix_prob, gamma=0.3, kd_temperature=3.0,
                     cutmix_ce_label=ce_label)
    ens = TeacherEnsemble(teachers)
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    student = mlp_student()
    tr = GVBSMTrainer(student, args, ds, None, spec=SPEC, soft_labeler=ens)

    seen = {}
    real_sample, real_cutmix = trainer_mod.sample_crop_flip, trainer_mod.cutmix

    def record_sample(*a, **k):
        seen["params"] = real_sample(*a, **k)
        return seen["params"]

    def record_cutmix(x, **k):
        seen["mix"] = real_cutmix(x, **k)
        return seen["mix"]

    monkeypatch.setattr(trainer_mod, "sample_crop_flip", record_sample)
    monkeypatch.setattr(trainer_mod, "cutmix", record_cutmix)

    batch = a_batch(ds)
    tr.state.global_step = 3
    loss = tr.compute_loss(student, dict(batch))
    grads = torch.autograd.grad(loss, list(student.parameters()))

    # by hand, from the recorded view (and mix)
    x = apply_crop_flip(batch["pixel_values"], seen["params"], 16)
    assert not torch.equal(x, batch["pixel_values"])  # really augmented
    y = batch["labels"]
    targets = y
    if cutmix_prob:
        x, perm, lam = seen["mix"]
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1)
        oh = F.one_hot(y, 10).double()
        if not (loss_type == "mse_gt" and ce_label == "original"):
            targets = lam * oh + (1 - lam) * oh[torch.as_tensor(perm)]
    else:
        assert "mix" not in seen
    z = ens(x)  # the teachers see the same augmented (mixed) batch
    s = student(x)
    ref = _reference_loss(loss_type, s, z, targets, args)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-6)
    # and the library functions agree
    if loss_type == "mse_gt":
        lib = losses.mse_gt_loss(s, z, targets.float() if targets.is_floating_point() else targets, gamma=args.gamma)
        torch.testing.assert_close(loss, lib, rtol=1e-5, atol=1e-6)


def test_augmentation_depends_on_seed_and_step(tmp_path, data, teachers):
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    batch = a_batch(ds)

    def view(seed, step):
        tr = GVBSMTrainer(mlp_student(), make_args(tmp_path, seed=seed, loss_type="ce"), ds, spec=SPEC)
        tr.state.global_step = step
        return tr.prepare_batch(batch["pixel_values"], batch["labels"], batch["index"], tr.step_generator())[0]

    assert torch.equal(view(0, 2), view(0, 2))
    assert not torch.equal(view(0, 2), view(0, 3))
    assert not torch.equal(view(0, 2), view(1, 2))


def test_hard_label_mode_uses_ce(tmp_path, data):
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    tr = GVBSMTrainer(mlp_student(), make_args(tmp_path, loss_type="mse_gt", student_augment=False), ds, spec=SPEC)
    assert tr.label_mode == "hard"
    batch = a_batch(ds)
    loss = tr.compute_loss(tr.model, dict(batch))
    s = tr.model(batch["pixel_values"])
    ref = -torch.log_softmax(s.double(), -1)[torch.arange(12), batch["labels"]].mean()
    torch.testing.assert_close(loss.double(), ref)


# ---- stored vs on-the-fly -------------------------------------------------------------------


def test_stored_and_on_the_fly_give_same_soft_labels_for_same_view(tmp_path, data, teachers, monkeypatch):
    ens = TeacherEnsemble(teachers)
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    stored = relabel_stored(ds.images, ens, RelabelArguments(relabel_num_views=3, relabel_seed=7), ViewSampling(16),
                            batch_size=16, show_progress=False)
    args = make_args(tmp_path)
    batch = a_batch(ds)

    tr_s = GVBSMTrainer(mlp_student(), args, ds, spec=SPEC, stored_labels=stored)
    assert tr_s.label_mode == "stored"
    tr_s.state.epoch = 4.5  # view 4 % 3 = 1
    x_s, z_s, _ = tr_s.prepare_batch(batch["pixel_values"], batch["labels"], batch["index"], tr_s.step_generator())

    # on the fly on exactly that view
    monkeypatch.setattr(trainer_mod, "sample_crop_flip", lambda *a, **k: stored.view_params(1, batch["index"]))
    tr_o = GVBSMTrainer(mlp_student(), make_args(tmp_path), ds, spec=SPEC, soft_labeler=ens)
    x_o, z_o, _ = tr_o.prepare_batch(batch["pixel_values"], batch["labels"], batch["index"], tr_o.step_generator())
    assert torch.equal(x_s, x_o)
    torch.testing.assert_close(z_s, z_o, atol=2e-3, rtol=2e-3)  # fp16 storage
    assert z_s.dtype == torch.float32

    # random policy: each image gets one of its own views, label and view matching
    tr_r = GVBSMTrainer(mlp_student(), make_args(tmp_path), ds, spec=SPEC, stored_labels=stored,
                        stored_view_policy="random")
    x_r, z_r, _ = tr_r.prepare_batch(batch["pixel_values"], batch["labels"], batch["index"], tr_r.step_generator())
    z_direct = ens(x_r)
    torch.testing.assert_close(z_r, z_direct, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("ce_label", ["original", "mixed"])
def test_stored_cutmix_views_are_replayed_with_their_partner(tmp_path, data, teachers, ce_label):
    """Stored views relabelled under CutMix: the student trains on the stored mixed view (partner
    pasted into the stored box), with the teachers' logits of THAT view, not a lambda-mix of
    unmixed logits; the GT term takes the original or the lambda-mixed label."""
    ens = TeacherEnsemble(teachers)
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    stored = relabel_stored(ds.images, ens, RelabelArguments(relabel_num_views=3, relabel_seed=7),
                            ViewSampling(16, cutmix_prob=1.0), show_progress=False)
    tr = GVBSMTrainer(mlp_student(), make_args(tmp_path, cutmix_prob=1.0, cutmix_ce_label=ce_label), ds, spec=SPEC,
                      stored_labels=stored)
    tr.state.epoch = 2.0  # view 2
    batch = a_batch(ds)
    x, z, targets = tr.prepare_batch(batch["pixel_values"], batch["labels"], batch["index"], tr.step_generator())
    index = batch["index"]
    partner = stored.mix_partner[index, 2].long()
    expected = stored.replay(ds.images[index], 2, index, partner_images=ds.images[partner])
    assert torch.equal(x, expected)
    torch.testing.assert_close(z, ens(expected), atol=2e-3, rtol=2e-3)  # the teachers on the mixed view
    assert torch.equal(z, stored.dense_logits(2, index))
    y, yp = batch["labels"], ds.labels[partner]
    if ce_label == "original":
        assert torch.equal(targets, y)
    else:
        box = stored.mix_boxes[index, 2].double()
        lam = 1 - (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]) / 256.0
        ref = lam[:, None] * F.one_hot(y, 10).double() + (1 - lam[:, None]) * F.one_hot(yp, 10).double()
        torch.testing.assert_close(targets.double(), ref, atol=1e-6, rtol=0)
    with pytest.raises(DataValidationError, match="cutmix_prob"):
        GVBSMTrainer(mlp_student(), make_args(tmp_path, cutmix_prob=0.0), ds, spec=SPEC, stored_labels=stored)


def test_stored_labels_count_mismatch_names_the_fix(tmp_path, data, teachers):
    ens = TeacherEnsemble(teachers)
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    stored = relabel_stored(ds.images[:10], ens, RelabelArguments(relabel_num_views=1), ViewSampling(16), show_progress=False)
    with pytest.raises(DataValidationError, match="re-run relabel_stored") as e:
        GVBSMTrainer(mlp_student(), make_args(tmp_path), ds, spec=SPEC, stored_labels=stored)
    assert "10" in str(e.value) and str(len(ds)) in str(e.value)
    with pytest.raises(DataValidationError, match="re-run relabel_stored"):
        evaluate_students(*data["distilled"], data["val"], SPEC, make_args(tmp_path), stored=stored,
                          students=["convnet"])


def test_bad_arguments(tmp_path, data, teachers):
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    with pytest.raises(GVBSMError, match="loss_type"):
        GVBSMTrainer(mlp_student(), make_args(tmp_path, loss_type="mse"), ds, spec=SPEC)
    with pytest.raises(GVBSMError, match="not both"):
        ens = TeacherEnsemble(teachers)
        st = relabel_stored(ds.images, ens, RelabelArguments(relabel_num_views=1), ViewSampling(16), show_progress=False)
        GVBSMTrainer(mlp_student(), make_args(tmp_path), ds, spec=SPEC, soft_labeler=ens, stored_labels=st)
    with pytest.raises(GVBSMError, match="classes"):
        other = DatasetSpec(name="x", num_classes=7, image_size=16, channels=1, mean=(0.3,), std=(0.4,))
        GVBSMTrainer(mlp_student(), make_args(tmp_path), ds, spec=other, stored_labels=st)
    with pytest.raises(UnknownBackboneError, match="convnett"):
        evaluate_students(*data["distilled"], data["val"], SPEC, make_args(tmp_path), students=["convnett"])


# ---- training runs -------------------------------------------------------------------------


def _top1_by_hand(model: nn.Module, val) -> float:
    x, y = val
    model.eval()
    with torch.no_grad():
        pred = model(SPEC.normalize(x).to(next(model.parameters()).device)).argmax(-1).cpu()
    return 100.0 * (pred == y).double().mean().item()


def test_short_run_lowers_loss_and_reports_last_epoch(tmp_path, data, teachers):
    ens = TeacherEnsemble(teachers)
    ds = SyntheticImageDataset(*data["distilled"], spec=SPEC)
    val = RealImageDataset(*data["val"], spec=SPEC)
    args = make_args(tmp_path, num_train_epochs=6, eval_strategy="epoch", load_best_model_at_end=False)
    torch.manual_seed(0)
    student = mlp_student()
    tr = GVBSMTrainer(student, args, ds, val, spec=SPEC, soft_labeler=ens)
    tr.train()
    losses_ = [h["loss"] for h in tr.state.log_history if "loss" in h]
    evals = [h for h in tr.state.log_history if "eval_top1" in h]
    assert len(evals) == 6 and len(losses_) >= 20
    assert sum(losses_[-4:]) / 4 < 0.7 * sum(losses_[:4]) / 4
    final = tr.evaluate()
    assert final["eval_top1"] == pytest.approx(_top1_by_hand(tr.model, data["val"]), abs=1e-6)
    assert final["eval_top1"] == pytest.approx(evals[-1]["eval_top1"], abs=1e-6)  # last epoch, not best
    assert final["eval_top1"] > 20.0  # well above chance (10 %) after 6 short epochs
    assert math.isfinite(final["eval_loss"])
    # the teachers were not prepared / wrapped and are not part of the checkpointed model
    assert tr.soft_labeler is ens and not any(n.startswith("soft_labeler") for n in tr.model.state_dict())


def test_evaluate_students_two_seeds_mean_std_and_determinism(tmp_path, data, teachers):
    ens = TeacherEnsemble(teachers)
    xs, ys = data["distilled"]
    stored = relabel_stored(SPEC.normalize(xs), ens, RelabelArguments(relabel_num_views=2), ViewSampling(16),
                            show_progress=False)
    args = make_args(tmp_path, num_train_epochs=2, student="convnet")
    res = evaluate_students(xs, ys, data["val"], SPEC, args, stored=stored, seeds=[0, 1],
                            backbone_kwargs=STUDENT_KW)
    runs = res["per_run"]
    assert [(r["student"], r["seed"]) for r in runs] == [("convnet", 0), ("convnet", 1)]
    assert len({r["output_dir"] for r in runs}) == 2
    accs = torch.tensor([r["top1"] for r in runs], dtype=torch.float64)
    summ = res["summary"]["convnet"]
    assert summ["n"] == 2
    assert summ["mean"] == pytest.approx(accs.mean().item())
    assert summ["std"] == pytest.approx(accs.std(unbiased=True).item())
    saved = json.loads((tmp_path / "out" / "evaluation_summary.json").read_text())
    assert saved["summary"] == res["summary"]

    args_b = make_args(tmp_path / "b", num_train_epochs=2, student="convnet")
    again = evaluate_students(xs, ys, data["val"], SPEC, args_b, stored=stored, seeds=[0], backbone_kwargs=STUDENT_KW)
    assert again["per_run"][0]["top1"] == runs[0]["top1"]
    assert again["per_run"][0]["train_loss"] == runs[0]["train_loss"]


def test_channels_last_student_trains_the_same(tmp_path, data, teachers):
    """``student_channels_last`` changes the memory format only: same run, same numbers (to
    float rounding), and the student really is channels_last."""
    ens = TeacherEnsemble(teachers)
    xs, ys = data["distilled"]
    results = {}
    for cl in (False, True):
        args = make_args(tmp_path / str(cl), num_train_epochs=2, student="convnet", student_channels_last=cl)
        res = evaluate_students(xs, ys, data["val"], SPEC, args, soft_labeler=ens, seeds=[0], backbone_kwargs=STUDENT_KW)
        results[cl] = res["per_run"][0]
    assert results[True]["train_loss"] == pytest.approx(results[False]["train_loss"], rel=1e-4)
    assert abs(results[True]["top1"] - results[False]["top1"]) <= 100.0 / len(data["val"][1]) + 1e-9
    student = create_backbone("convnet", 10, 1, 16, **STUDENT_KW).to(memory_format=torch.channels_last)
    args = make_args(tmp_path / "fmt", student_channels_last=True)
    tr = GVBSMTrainer(student, args, SyntheticImageDataset(xs, ys, spec=SPEC), spec=SPEC, soft_labeler=ens)
    batch = a_batch(SyntheticImageDataset(xs, ys, spec=SPEC))
    assert tr._memory_format(batch["pixel_values"]).is_contiguous(memory_format=torch.channels_last)


# ---- per-run progress, reuse and exact resume ------------------------------------------------


class _Kill(Exception):
    """Stands in for a kill (SIGTERM, pre-emption) in the middle of a student run."""


class KillAt(TrainerCallback):
    """Raise at the end of optimizer step ``step`` of the run trained with ``seed``."""

    def __init__(self, step: int, seed: int | None = None):
        self.step, self.seed = step, seed

    def on_step_end(self, args, state, control, **kwargs):
        if (self.seed is None or args.seed == self.seed) and state.global_step == self.step:
            raise _Kill(f"killed at step {state.global_step} of seed {args.seed}")


class Record(TrainerCallback):
    """Counts ``train()`` calls per seed and keeps the final weights of each run."""

    def __init__(self):
        self.trained: list[int] = []
        self.final: dict[int, dict[str, torch.Tensor]] = {}
        self.first_step: dict[int, int] = {}
        self.history: dict[int, list[dict]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.trained.append(args.seed)

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_step.setdefault(args.seed, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final[args.seed] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        keep = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "eval_top1")
        self.history[args.seed] = [{k: h[k] for k in keep if k in h} for h in state.log_history]


def _run_kw(data, **kw):
    xs, ys = data["distilled"]
    return dict(train_images=xs, train_labels=ys, validation=data["val"], spec=SPEC, backbone_kwargs=STUDENT_KW, **kw)


def test_on_run_done_per_seed_in_order_and_survives_a_kill(tmp_path, data):
    args = make_args(tmp_path, student="convnet", loss_type="ce", num_train_epochs=1)
    rows = []
    with pytest.raises(_Kill):
        evaluate_students(**_run_kw(data, args=args, seeds=[0, 1, 2], callbacks=[KillAt(2, seed=1)],
                                    on_run_done=rows.append))
    # seed 0 was reported (and written) before seed 1 died; nothing else was
    assert [(r["student"], r["seed"]) for r in rows] == [("convnet", 0)]
    saved = json.loads((tmp_path / "out" / "convnet" / "seed0" / "run_result.json").read_text())
    assert saved["result"]["top1"] == rows[0]["top1"] and saved["result"]["seed"] == 0
    assert saved["settings"]["seed"] == 0 and saved["settings"]["label_mode"] == "hard"
    assert not (tmp_path / "out" / "convnet" / "seed1" / "run_result.json").exists()

    rows2 = []
    res = evaluate_students(**_run_kw(data, args=args, seeds=[0, 1, 2], on_run_done=rows2.append))
    assert [r["seed"] for r in rows2] == [0, 1, 2]  # once per seed, in order (seed 0 reused from its file)
    assert [r["seed"] for r in res["per_run"]] == [0, 1, 2]
    assert rows2[0]["top1"] == rows[0]["top1"]
    assert [r["top1"] for r in rows2] == [r["top1"] for r in res["per_run"]]


def test_completed_and_saved_runs_are_not_retrained(tmp_path, data):
    args = make_args(tmp_path, student="convnet", loss_type="ce", num_train_epochs=1)
    first = Record()
    res = evaluate_students(**_run_kw(data, args=args, seeds=[0, 1], callbacks=[first]))
    assert first.trained == [0, 1]

    # rows passed as `completed`: trained nothing, returned as given
    fake = [{"student": "convnet", "seed": 0, "top1": 12.5}, {"student": "convnet", "seed": 1, "top1": 37.5}]
    rec, called = Record(), []
    again = evaluate_students(**_run_kw(data, args=args, seeds=[0, 1], callbacks=[rec], completed=fake,
                                        on_run_done=called.append))
    assert rec.trained == [] and called == []
    assert [r["top1"] for r in again["per_run"]] == [12.5, 37.5]
    assert again["summary"]["convnet"]["mean"] == pytest.approx(25.0)

    # no `completed`: the run_result.json files are reused
    rec = Record()
    again = evaluate_students(**_run_kw(data, args=args, seeds=[0, 1], callbacks=[rec]))
    assert rec.trained == []
    assert [r["top1"] for r in again["per_run"]] == [r["top1"] for r in res["per_run"]]
    assert again["summary"] == res["summary"]

    # mixed: seed 0 completed, seed 2 new -> only seed 2 trains
    rec = Record()
    mixed = evaluate_students(**_run_kw(data, args=args, seeds=[0, 2], callbacks=[rec], completed=fake[:1]))
    assert rec.trained == [2] and [r["seed"] for r in mixed["per_run"]] == [0, 2]
    assert mixed["per_run"][0]["top1"] == 12.5

    # different settings or different training images: retrained, not reused
    for changed in (
        dict(args=make_args(tmp_path, student="convnet", loss_type="ce", num_train_epochs=2)),
        dict(args=args, train_images=data["distilled"][0].flip(-1)),
    ):
        rec = Record()
        kw = _run_kw(data, seeds=[0], callbacks=[rec])
        kw.update(changed)
        evaluate_students(**kw)
        assert rec.trained == [0]

    # a forced redo retrains
    rec = Record()
    evaluate_students(**_run_kw(data, args=args, seeds=[0], callbacks=[rec], reuse_saved_runs=False))
    assert rec.trained == [0]


@pytest.mark.parametrize("kill_step, save_steps, logging", [
    (7, 5, {"logging_steps": 3}),
    (6, 4, {"logging_strategy": "epoch"}),
    (7, 5, {"logging_steps": 2, "student_ema_decay": 0.8, "student_lr_smoothing": 2.0, "warmup_steps": 2}),
])
def test_killed_student_resumes_bit_exactly(tmp_path, data, teachers, kill_step, save_steps, logging):
    """On-the-fly soft labels, CutMix, gradient accumulation, an eval per epoch (and the EDC student
    EMA and smoothing schedule): a run killed after a checkpoint and resumed ends with the weights,
    accuracy, loss, logged losses and curve of an uninterrupted run. 60 images, batch 8, 2
    accumulation steps: 4 optimizer steps per epoch, 12 in all; checkpoints every 5 steps (mid-epoch:
    the Trainer skips the seen batches) or 4 (on an epoch's last step, moved after that epoch's own
    eval / log). The running loss travels in ``trainer_state.json`` (``ExportableState``)."""
    ens = TeacherEnsemble(teachers)
    expect_resume = save_steps
    common = dict(student="convnet", num_train_epochs=3, per_device_train_batch_size=8,
                  gradient_accumulation_steps=2, cutmix_prob=0.5, lr_scheduler_type="linear",
                  eval_strategy="epoch", **logging)
    ref = Record()
    want = evaluate_students(**_run_kw(data, args=make_args(tmp_path / "ref", **common), seeds=[0],
                                       soft_labeler=ens, callbacks=[ref]))["per_run"][0]

    args = make_args(tmp_path / "killed", save_strategy="steps", save_steps=save_steps, save_total_limit=1, **common)
    rec = Record()
    with pytest.raises(_Kill):
        evaluate_students(**_run_kw(data, args=args, seeds=[0], soft_labeler=ens, callbacks=[rec, KillAt(kill_step)]))
    run_dir = tmp_path / "killed" / "out" / "convnet" / "seed0"
    assert (run_dir / f"checkpoint-{expect_resume}").is_dir() and not (run_dir / "run_result.json").exists()
    saved = json.loads((run_dir / f"checkpoint-{expect_resume}" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["ExactResumeCallback"]["attributes"]["last_logged_step"] <= expect_resume
    assert (run_dir / f"checkpoint-{expect_resume}" / "gvbsm_student_ema.safetensors").is_file() == (
        "student_ema_decay" in logging)
    (run_dir / "checkpoint-11").mkdir()  # a checkpoint cut short by the kill (no trainer_state.json): skipped

    rec = Record()
    got = evaluate_students(**_run_kw(data, args=args, seeds=[0], soft_labeler=ens, callbacks=[rec]))["per_run"][0]
    assert rec.trained == [0] and rec.first_step[0] == expect_resume  # resumed, not restarted
    assert got["resumed_from_step"] == expect_resume and want["resumed_from_step"] is None
    assert ref.final[0].keys() == rec.final[0].keys()
    for k, v in ref.final[0].items():
        assert torch.equal(v, rec.final[0][k]), k
    assert got["top1"] == want["top1"]
    assert got["eval_loss"] == want["eval_loss"]
    assert got["train_loss"] == want["train_loss"]
    assert got["eval_top1_history"] == want["eval_top1_history"] and len(got["eval_top1_history"]) == 3
    assert rec.history[0] == ref.history[0]  # every logged loss, grad norm, learning rate and evaluation
    assert sum("loss" in h for h in ref.history[0]) >= 3
    assert not (run_dir / "checkpoint-11").exists() and (run_dir / "run_result.json").exists()
