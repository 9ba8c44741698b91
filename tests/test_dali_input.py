"""input.loader=dali: DALI cuts the crops that tf.data's draws choose (its CPU mode here)."""

import dataclasses

import jax
import numpy as np
import pytest
import tensorflow as tf
from test_paper256 import _cfg, prepared  # noqa: F401  (the prepared paper-256 fixture)

from alexnet_jax import UsageError, dali_input, loaders, sources, train, transforms
from alexnet_jax import input_pipeline as ip
from alexnet_jax.batch import Batch

FIELDS = {"images", "crops", "shifts", "labels"}  # what a uint8 train batch holds


def _digits():
    source = sources.digits_source()
    stats = transforms.Stats(
        (120.0, 120.0, 120.0), (0.2, 0.02, 0.005), tuple(map(tuple, np.eye(3)))
    )
    return source, transforms.Preprocess(stats, 27, 32, True, 0.1, on_device=True)


def _train(loader, source, p, start=0, steps=4, rows=None, batch=8):
    stream = dict(seed=5, batch_size=batch, start_step=start, num_steps=steps, rows=rows)
    p = dataclasses.replace(p, loader=loader)
    return list(loaders.train_batches(source, p, threads=2, **stream))


def _eval(loader, source, p, rows=None, batch=8):
    p = dataclasses.replace(p, loader=loader)
    return list(loaders.eval_batches(source, p, batch_size=batch, rows=rows, threads=2))


def _held(batch):
    """The names of the arrays a Batch holds."""
    return {k for k, v in batch._asdict().items() if v is not None}


def _assert_same(got, want, images=True):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert _held(a) == _held(b)
        for k in _held(a):
            if k != "images" or images:
                np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


def test_dali_cuts_the_digits_crops_tf_data_cuts():
    source, p = _digits()
    want = _train("tf.data", source, p)
    assert _held(want[0]) == FIELDS
    # The draws differ between examples: equal batches mean the same windows were cut.
    assert len({tuple(c) for b in want for c in b.crops}) > 16
    assert not np.array_equal(want[0].images[0], want[0].images[1])
    _assert_same(_train("dali", source, p), want)
    # A process's rows, and a resumed stream, are tf.data's too.
    _assert_same(
        _train("dali", source, p, rows=[2, 3, 6]), _train("tf.data", source, p, rows=[2, 3, 6])
    )
    _assert_same(_train("dali", source, p, start=2), want[2:])


@pytest.mark.parametrize("ten", [False, True])
def test_dali_eval_centre_and_ten_patches_equal_tf_data(ten):
    source, p = _digits()
    p = dataclasses.replace(p, ten_crop=ten)
    want = _eval("tf.data", source, p, batch=64)
    assert want[0].images.shape[1:] == ((10,) if ten else ()) + (27, 27, 3)
    assert want[-1].weights.min() == 0  # the last batch is padded
    _assert_same(_eval("dali", source, p, batch=64), want)
    _assert_same(
        _eval("dali", source, p, rows=[1, 5], batch=8), _eval("tf.data", source, p, rows=[1, 5])
    )


def _reference(source, p, start, steps, batch, fancy):
    """tf.data's train stream, its windows decoded by TensorFlow with or without
    interpolated chroma upsampling (the exact IDCT)."""
    stream = dict(seed=5, batch_size=batch, start_step=start, num_steps=steps)
    prepare = dali_input.train_prepare(source, p)
    uncut = list(ip.iterate(ip.train_dataset(source, p, prepare=prepare, **stream), source.train))
    batches = []
    for b in uncut:
        crops = []
        for jpeg, (top, left) in zip(b.pop("encoded"), b.pop("window"), strict=True):
            window = [top, left, p.image_size, p.image_size]
            crops.append(
                tf.io.decode_and_crop_jpeg(
                    jpeg, window, 3, fancy_upscaling=fancy, dct_method="INTEGER_ACCURATE"
                ).numpy()
            )
        batches.append(Batch(images=np.stack(crops), **b))
    return batches


def _paper256(prepared):  # noqa: F811
    source = sources.paper256_source(_cfg(prepared))
    stats = transforms.Stats.from_dict(source.stats, source.mean_image)
    return source, transforms.Preprocess(stats, 227, 256, True, 0.1, mean="image", on_device=True)


def test_dali_decodes_the_paper256_windows_tf_data_draws(prepared):  # noqa: F811
    source, p = _paper256(prepared)
    got = _train("dali", source, p, steps=3, batch=4)
    used = _train("tf.data", source, p, steps=3, batch=4)
    _assert_same(got, used, images=False)  # the same windows, mirrors, shifts and labels
    assert len({tuple(c) for b in used for c in b.crops}) > 8
    # Pixels: DALI's decoder interpolates chroma (libjpeg-turbo's "fancy" upsampling); the
    # same windows decoded so by TensorFlow agree on all but a few pixels; windows one pixel
    # off agree on far fewer (these smooth test photographs still share many).
    fancy = _reference(source, p, 0, 3, 4, fancy=True)
    a = np.concatenate([b.images for b in got]).astype(int)
    same = np.mean(a == np.concatenate([b.images for b in fancy]))
    assert same > 0.999, same
    shifted = np.mean(a[:, :-1] == np.concatenate([b.images for b in fancy])[:, 1:])
    assert shifted < 0.9, shifted
    # Against the tf.data path (no chroma interpolation): the difference stated in
    # docs/performance.md, a grey level or two on average.
    diff = np.abs(a - np.concatenate([b.images for b in used]))
    assert 0 < diff.mean() < 2.5, diff.mean()
    # A resumed stream sees the same batches.
    _assert_same(_train("dali", source, p, start=1, steps=3, batch=4), got[1:])


@pytest.mark.parametrize("ten", [False, True])
def test_dali_paper256_eval_patches(prepared, ten):  # noqa: F811
    source, p = _paper256(prepared)
    p = dataclasses.replace(p, ten_crop=ten)
    got, want = _eval("dali", source, p, batch=4), _eval("tf.data", source, p, batch=4)
    _assert_same(got, want, images=False)
    assert sum(b.weights.sum() for b in got) == source.eval.size == 6
    real = np.concatenate([b.weights for b in got]) > 0  # padding rows' pixels differ
    a = np.concatenate([b.images for b in got])[real].astype(int)
    diff = np.abs(a - np.concatenate([b.images for b in want])[real])
    assert 0 < diff.mean() < 2.5, diff.mean()
    if ten:  # the patches are the centre and corners, twice (the device mirrors five)
        np.testing.assert_array_equal(a[:, :5], a[:, 5:])
        assert not np.array_equal(a[:, 0], a[:, 4])


@pytest.mark.slow  # a short run
def test_a_run_with_dali_trains_and_evaluates_on_paper256(prepared, tmp_path):  # noqa: F811
    from conftest import tiny_config

    config = tiny_config(
        **{
            "input.dataset": "imagenet2012_paper256",
            "input.data_dir": str(prepared[0] / "data"),
            "input.resize_size": 256,
            "input.loader": "dali",
            "model.num_classes": 1000,
            "batch_size": 8,
            "num_train_steps": 2,
            "eval_every_steps": 2,
        }
    )
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/count"] == 6 and np.isfinite(metrics["eval/loss"])


@pytest.mark.slow  # two short runs
def test_a_digits_run_with_dali_logs_what_tf_data_logs(tmp_path):
    from conftest import tiny_config

    from alexnet_jax import metrics

    for loader in ("tf.data", "dali"):
        config = tiny_config(**{"input.loader": loader, "num_train_steps": 3})
        train.train_and_evaluate(config, str(tmp_path / loader))
    drop = ("images_per_sec", "data_wait", "seconds", "time", "memory")
    runs = [
        [
            {k: v for k, v in m.items() if not any(d in k for d in drop)}
            for m in metrics.read_metrics(tmp_path / x)
        ]
        for x in ("tf.data", "dali")
    ]
    assert any("eval/loss" in m for m in runs[0]) and runs[0] == runs[1]


def test_an_image_dali_cannot_decode_stops_the_run_in_one_message():
    source, p = _digits()
    batch = {
        "encoded": np.array([b"\xff\xd8 not a JPEG"], object),
        "window": np.zeros((1, 2), np.int32),
    }
    cut = dali_input._Pipeline(1, 27, None, 1)
    with pytest.raises(UsageError, match="could not be decoded.*\nDALI said: ") as e:
        next(dali_input._decoded(iter([batch]), cut, source.train, train=True))
    assert "Traceback" not in str(e.value)


def test_crops_decoded_on_a_gpu_reach_jax_without_the_host(monkeypatch):
    """Where DALI decodes on a GPU its output becomes a jax.Array through DLPack, never
    through the host, and a copy (DALI reuses its buffers for the next batch), which
    global_batch shards as it does the NumPy batch; on the CPU the crops stay NumPy, on
    tf.data's path. The GPU is faked: a built pipeline that returns a DALI TensorList (a CPU
    one, which DLPack carries the same way), then a JAX array behind DALI's interface, whose
    buffer tells whether it was copied."""
    from nvidia.dali.backend import TensorListCPU

    from alexnet_jax import parallel

    want = np.arange(8 * 5 * 5 * 3, dtype=np.uint8).reshape(8, 5, 5, 3)

    class Built:  # a built DALI pipeline
        def feed_input(self, name, data):
            pass

        def run(self):
            return (TensorListCPU(want),)

    def cut():
        pipeline = dali_input._Pipeline(8, 5, None, 1)
        pipeline._built[True] = Built()
        return pipeline([np.zeros(3, np.uint8)] * 8, np.zeros((8, 2), np.int32))

    assert isinstance(cut(), np.ndarray)  # DALI on the CPU
    monkeypatch.setattr(dali_input, "device", lambda: "mixed")
    got = cut()
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), want)
    mesh = parallel.create_mesh(4, 2)
    placed = parallel.global_batch(mesh, {"images": got}, 8)["images"]
    from_host = parallel.global_batch(mesh, {"images": want}, 8)["images"]
    assert placed.sharding == from_host.sharding
    np.testing.assert_array_equal(np.asarray(placed), want)

    class GPUList:  # DALI's TensorListGPU, as far as to_jax uses it
        def __init__(self, array):
            self.array = array

        def as_tensor(self):
            return self.array

    buffer = jax.device_put(want, jax.local_devices()[0])
    copied = dali_input.to_jax(GPUList(buffer))
    assert copied.devices() == buffer.devices()
    assert copied.unsafe_buffer_pointer() != buffer.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(copied), want)
