"""torchvision's AlexNet weights in this project's layout: logits equal to torch's, a checkpoint
that predict, the eval mode and fine-tuning take as it is, and clear refusals.

torch comes with the test extra (the CPU build); torchvision does not load beside it, so the
torch model is benchmarks/torch_alexnet.py's, which has torchvision's structure and keys."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason='needs PyTorch: pip install -e ".[torch]"')

from alexnet_jax import (  # noqa: E402
    UsageError,
    checkpoint,
    load_checkpoint,
    transforms,
)
from alexnet_jax import convert_torchvision as ct  # noqa: E402
from alexnet_jax.model import AlexNet  # noqa: E402
from benchmarks import torch_alexnet  # noqa: E402

TORCHVISION_KEYS = [  # torchvision.models.alexnet().state_dict().keys()
    f"{part}.{i}.{p}"
    for part, idx in (("features", (0, 3, 6, 8, 10)), ("classifier", (1, 4, 6)))
    for i in idx
    for p in ("weight", "bias")
]


def _torch_model(variant="owt", seed=0):
    torch.manual_seed(seed)
    return torch_alexnet.build(variant).eval()


def _logits(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant, size, scale", [("owt", 224, 1.0), ("paper", 227, 100.0)])
def test_logits_equal_torch_and_fc6_needs_its_reorder(variant, size, scale):
    """scale: the paper model sees 0-255-sized inputs, where its LRN is far from a constant."""
    m = _torch_model(variant)
    sd = _state_dict(m)
    if variant == "owt":
        assert list(sd) == TORCHVISION_KEYS
    x = scale * np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
    assert _rel(x[0], x[1]) > 0.5
    want = _logits(m, x)
    assert _rel(want[0], want[1]) > 1e-3  # the images give different logits
    params = ct.from_torch(sd)
    got = np.asarray(AlexNet(variant=variant).apply({"params": params}, x))
    assert _rel(got, want) < 1e-4
    # fc6 taken over without the C,H,W -> H,W,C reorder: another function.
    params["fc6"]["kernel"] = sd[ct.layer_keys(sd)["fc6"] + ".weight"].T
    wrong = np.asarray(AlexNet(variant=variant).apply({"params": params}, x))
    assert _rel(wrong, want) > 0.1
    # And back: the same state dict, bit for bit.
    back = torch_alexnet.to_torch(ct.from_torch(sd), ct.layer_keys(sd))
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_the_paper_lrn_stays_within_each_tower():
    """torch's LocalResponseNorm over all 96 channels differs from the per-tower one exactly at
    the channels next to the tower boundary."""
    x = torch.from_numpy(100 * np.random.default_rng(2).normal(size=(1, 96, 5, 5)).astype("f4"))
    towers, whole = torch_alexnet.TowerLRN(2)(x), torch_alexnet.TowerLRN(1)(x)
    differs = (towers - whole).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert differs.nonzero().flatten().tolist() == [46, 47, 48, 49]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random torchvision-layout weights converted in process: (torch model, workdir)."""
    from configs import owt

    m = _torch_model("owt", seed=3)
    workdir = tmp_path_factory.mktemp("converted")
    ct.convert(_state_dict(m), workdir, owt.get_config())
    return m, workdir


def test_predict_uses_torchvisions_preprocessing(converted):
    m, workdir = converted
    restored = load_checkpoint(workdir)
    assert restored.step == 0 and restored.config.model.variant == "owt"
    assert restored.class_names[0].startswith("tench") and len(restored.class_names) == 1000
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    assert (images[0] != images[1]).mean() > 0.9
    # torchvision's eval transform at 256x256: centre 224 crop, /255, (x - mean) / std.
    crop = images[:, 16:240, 16:240].astype(np.float32) / 255.0
    x = (crop - np.float32(ct.TORCHVISION_MEAN)) / np.float32(ct.TORCHVISION_STD)
    want = torch.softmax(torch.from_numpy(_logits(m, x)), -1).numpy()
    got = restored.predict(images)
    assert _rel(got, want) < 1e-4


def test_refusals_leave_nothing_behind(converted, tmp_path):
    from configs import owt

    m, workdir = converted
    steps = checkpoint.Checkpointer(workdir, read_only=True).manager.all_steps()
    with pytest.raises(UsageError, match="already holds checkpoints"):
        ct.convert(_state_dict(m), workdir, owt.get_config())
    assert checkpoint.Checkpointer(workdir, read_only=True).manager.all_steps() == steps
    paper = _state_dict(_torch_model("paper"))
    with pytest.raises(
        UsageError, match="conv1/kernel: weights \\(11, 11, 3, 96\\), model \\(11, 11, 3, 64\\)"
    ):
        ct.convert(paper, tmp_path / "paper", owt.get_config())
    with pytest.raises(UsageError, match="found 2 \\(\\['classifier.1', 'classifier.4'\\]\\)"):
        ct.from_torch({k: v for k, v in _state_dict(m).items() if "classifier.6" not in k})
    with pytest.raises(UsageError, match="has features.3.weight but no features.3.bias"):
        ct.from_torch({k: v for k, v in _state_dict(m).items() if k != "features.3.bias"})
    assert not (tmp_path / "paper").exists()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 this is no torch file")
    with pytest.raises(UsageError, match="bad.pth is not a readable PyTorch file"):
        ct.read_pth(bad)
    with pytest.raises(UsageError, match="no such file"):
        ct.read_pth(tmp_path / "missing.pth")


def test_read_pth_takes_torchvisions_files_and_wrapped_ones(tmp_path):
    m = _torch_model("owt")
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(m.state_dict(), plain)
    prefixed = {f"module.{k}": v for k, v in m.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": prefixed}, wrapped)
    sd = _state_dict(m)
    for path in (plain, wrapped):
        read = ct.read_pth(path)
        assert list(read) == TORCHVISION_KEYS
        assert all(np.array_equal(read[k], sd[k]) for k in sd)


@pytest.mark.slow  # three launches of the full-size owt model on tiny ILSVRC data
def test_the_cli_then_eval_mode_then_fine_tuning(repo, tmp_path):
    from test_paper256 import make_tars

    from alexnet_jax import paper256

    m = _torch_model("owt", seed=5)
    pth, workdir = tmp_path / "alexnet.pth", tmp_path / "run"
    torch.save(m.state_dict(), pth)
    (tmp_path / "tars").mkdir()
    make_tars(tmp_path / "tars")
    paper256.prepare(str(tmp_path / "data"), str(tmp_path / "tars"), processes=1)

    def run(*args):
        r = subprocess.run(
            [sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    run("-m", "alexnet_jax.convert_torchvision", f"--pth={pth}", f"--workdir={workdir}")
    launch = [
        str(repo / "launch.py"),
        f"--config={repo / 'configs/owt.py'}",
        f"--workdir={workdir}",
        f"--config.input.data_dir={tmp_path / 'data'}",
        "--config.batch_size=4",
    ]
    run(*launch, "--mode=eval")
    (line,) = [
        json.loads(s) for s in (workdir / "eval_mode/metrics.jsonl").read_text().split("\n") if s
    ]
    assert line["step"] == 0 and line["eval/count"] == 6 and line["eval_ten_crop/count"] == 6
    run(*launch, "--config.num_train_steps=1", "--config.eval_every_steps=1")
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.manager.all_steps() == [0, 1]
    assert ckpt.data(1)["stats"] == ckpt.data(0)["stats"]  # fine-tuning kept torchvision's
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    before, after = (ckpt.read(s, sharding).state["params"]["fc8"]["kernel"] for s in (0, 1))
    assert not np.array_equal(before, after)
    stats = transforms.Stats.from_dict(ckpt.data(1)["stats"])
    np.testing.assert_allclose(stats.std(), 255 * np.array(ct.TORCHVISION_STD))
