"""Squeeze: teacher training on sklearn's digits (8 px upsampled to 16 px), resume, 2 processes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gvbsm_hf.squeeze.config import SqueezeArguments
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.errors import DataValidationError, GVBSMError, NonFiniteLossError
from gvbsm_hf.squeeze.engine import _lr_at, train_teacher
from gvbsm_hf.teacher import load_teacher

TESTS_DIR = Path(__file__).resolve().parent


def make_digits(n_val: int = 397):
    """(train, validation, spec) from sklearn's digits: uint8 (N, 1, 16, 16) images, int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[n_val:], perm[:n_val]
    pixels = x[tr].float() / 255
    spec = DatasetSpec("digits", 10, 16, 1, (pixels.mean().item(),), (pixels.std().item(),),
                       tuple(str(i) for i in range(10)))
    return (x[tr], y[tr]), (x[va], y[va]), spec


@pytest.fixture(scope="module")
def digits():
    return make_digits()


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _args(**kw):
    base = dict(teacher_epochs=3, teacher_batch_size=64, teacher_lr=0.05, teacher_seed=0)
    return SqueezeArguments(**{**base, **kw})


def _top1(teacher, split, spec):
    images, labels = split
    with torch.no_grad():
        return (teacher(spec.normalize(images)).argmax(1) == labels).double().mean().item()


def test_lr_schedule_warmup_then_cosine():
    lrs = [_lr_at(s, 100, 5, 0.1) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # non-increasing after warm-up
    assert lrs[52] == pytest.approx(0.05, rel=0.05) and lrs[-1] < 1e-3


def test_convnet_learns_digits(digits, accelerator, tmp_path):
    train, val, spec = digits
    teacher = train_teacher("convnet", train, val, spec, _args(), accelerator=accelerator, output_dir=tmp_path,
                            backbone_kwargs={"width": 32})
    assert teacher.metrics["val_top1"] > 0.6  # chance is 0.1
    assert teacher.metrics["epochs"] == 3 and teacher.metrics["train_time_s"] > 0
    # the reported top-1 is the top-1 of the saved weights on the validation split
    assert _top1(teacher.cpu().eval(), val, spec) == pytest.approx(teacher.metrics["val_top1"], abs=1e-9)
    loaded = load_teacher(tmp_path)
    x = spec.normalize(val[0][:16])
    assert torch.equal(loaded(x), teacher(x))
    assert loaded.metrics == teacher.metrics and loaded.backbone_kwargs == {"width": 32}
    assert type(loaded.backbone.features[1]) is torch.nn.BatchNorm2d
    card = (tmp_path / "README.md").read_text()
    assert "digits" in card and "random crop (pad 4) + horizontal flip" in card
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_44", "step_66"]  # keep 2


def test_resume_matches_uninterrupted(digits, accelerator, tmp_path, monkeypatch):
    train, val, spec = digits
    train = (train[0][:500], train[1][:500])  # 8 steps per epoch, last batch of 52
    args = _args(teacher_epochs=2)
    kw = dict(accelerator=accelerator, backbone_kwargs={"width": 16})
    full = train_teacher("convnet", train, val, spec, args, output_dir=tmp_path / "full", **kw)

    stopped = train_teacher("convnet", train, val, spec, args, output_dir=tmp_path / "cut", max_steps=11, **kw)
    assert (tmp_path / "cut" / "checkpoints" / "step_11").is_dir()
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # only a finished run is saved
    assert not all(torch.equal(a, b) for a, b in zip(stopped.state_dict().values(), full.state_dict().values()))

    loaded_from = []
    original = Accelerator.load_state

    def spy(self, input_dir=None, **kwargs):
        loaded_from.append(Path(input_dir).name)
        return original(self, input_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "load_state", spy)
    resumed = train_teacher("convnet", train, val, spec, args, output_dir=tmp_path / "cut", **kw)
    assert loaded_from == ["step_11"]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.metrics["val_top1"] == full.metrics["val_top1"]
    assert load_teacher(tmp_path / "cut").fingerprint == full.fingerprint


def test_checkpoint_of_another_run_is_refused(digits, accelerator, tmp_path):
    train, val, spec = digits
    train = (train[0][:200], train[1][:200])
    kw = dict(accelerator=accelerator, output_dir=tmp_path, backbone_kwargs={"width": 4})
    train_teacher("convnet", train, val, spec, _args(teacher_epochs=1), max_steps=2, **kw)
    with pytest.raises(GVBSMError, match="Delete"):
        train_teacher("convnet", train, val, spec, _args(teacher_epochs=1, teacher_batch_size=32), **kw)


def test_nan_loss_names_lr_and_checkpoint(digits, accelerator, tmp_path):
    train, val, spec = digits
    args = _args(teacher_epochs=2, teacher_lr=1e30, teacher_augment=False)
    with pytest.raises(NonFiniteLossError) as info:
        train_teacher("convnet", train, val, spec, args, accelerator=accelerator, output_dir=tmp_path,
                      backbone_kwargs={"width": 4, "norm": "none"})
    msg = str(info.value)
    assert "1e+30" in msg and "teacher_lr" in msg and "checkpoint" in msg


def test_bad_inputs_name_the_fix(digits, accelerator, tmp_path):
    (x, y), val, spec = digits
    with pytest.raises(DataValidationError, match="to_uint8_tensors"):
        train_teacher("convnet", (x.float(), y), val, spec, _args(), accelerator=accelerator, output_dir=tmp_path)
    with pytest.raises(DataValidationError, match=r"\[0, 10\)"):
        train_teacher("convnet", (x, y + 1), val, spec, _args(), accelerator=accelerator, output_dir=tmp_path)


TWO_PROCESS_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests_dir!r})
import torch.distributed as dist
from accelerate import Accelerator
from gvbsm_hf.squeeze.engine import train_teacher
from test_squeeze import make_digits, two_process_setup

acc = Accelerator(cpu=True)
train, val, spec, args, kwargs = two_process_setup()
train_teacher("convnet", train, val, spec, args, accelerator=acc, output_dir={out!r}, **kwargs)
info = dict(num_processes=acc.num_processes, world_size=dist.get_world_size() if dist.is_initialized() else 1,
            rank=acc.process_index, distributed_type=str(acc.distributed_type))
with open(os.path.join({out!r}, f"rank{{acc.process_index}}.json"), "w") as f:
    json.dump(info, f)
"""


def two_process_setup():
    """Shared by the test and the torchrun script: 291 images (uneven last global batch), augmentation on."""
    train, val, spec = make_digits()
    train = (train[0][:291], train[1][:291])
    args = _args(teacher_epochs=2, teacher_batch_size=64)
    return train, val, spec, args, {"backbone_kwargs": {"width": 8}}


def test_two_processes_train_the_same_teacher(accelerator, tmp_path):
    out = tmp_path / "two"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT.format(tests_dir=str(TESTS_DIR), out=str(out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    (tmp_path / 'stderr.txt').write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]

    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1]
    assert all(i["num_processes"] == 2 and i["world_size"] == 2 for i in infos)

    train, val, spec, args, kwargs = two_process_setup()
    single = train_teacher("convnet", train, val, spec, args, accelerator=accelerator, output_dir=tmp_path / "one",
                           **kwargs)
    two = load_teacher(out)
    assert two.config["recipe"]["processes"] == 2
    for (name, a), b in zip(single.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-4, msg=name)
