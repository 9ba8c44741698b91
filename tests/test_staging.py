"""staging.py: a dataset in a bucket copied to each host once, file by file, its metadata last;
a copy cut short finished with what it lacks; a copy of the wrong size refused."""

import pytest
from etils import epath
from etils.epath import gpath
from test_lifecycle import _redirect

from alexnet_jax import UsageError, paths, staging

RELATIVE = "ds/1.0.0"
FILES = {
    "ds-train.array_record-00000-of-00002": b"a" * 1000,
    "ds-train.array_record-00001-of-00002": b"b" * 3000,
    "features.json": b"{}",
    staging.FINISHED: b'{"name": "ds"}',
}


class NotPrepared(UsageError):
    pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/data/ds/1.0.0 holding FILES (and a sub-directory, which is not copied),
    redirected to tmp_path/bucket; yields the local stage_dir."""
    remote = tmp_path / "bucket" / "data" / RELATIVE
    (remote / "extra").mkdir(parents=True)
    for name, data in FILES.items():
        (remote / name).write_bytes(data)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # etils' own gs:// backend
    with epath.testing.mock_epath(**_redirect(tmp_path)):
        yield tmp_path / "stage"


def _stage(stage_dir, data_dir="gs://bucket/data"):
    return staging.local_dataset(data_dir, RELATIVE, str(stage_dir), NotPrepared)


def test_a_bucket_dataset_is_copied_once_with_its_metadata_last(bucket, monkeypatch):
    copied = []
    real = staging._copy
    monkeypatch.setattr(staging, "_copy", lambda s, d, n: copied.append(d.name) or real(s, d, n))
    local = _stage(bucket)
    assert local == bucket / "gs" / "bucket" / "data" / RELATIVE
    assert {p.name: p.read_bytes() for p in local.iterdir()} == FILES  # no sub-directory
    assert copied[-1] == staging.FINISHED and sorted(copied) == sorted(FILES)
    copied.clear()
    assert _stage(bucket) == local and copied == []  # a second start copies nothing


def test_a_copy_cut_short_is_finished_with_what_it_lacks(bucket):
    local = _stage(bucket)
    shards = sorted(local.glob("*.array_record-*"))
    (local / staging.FINISHED).unlink()
    shards[0].write_bytes(b"a" * 10)  # truncated
    remote = epath.Path("gs://bucket/data") / RELATIVE
    assert staging.stage(remote, local) == 1000  # the truncated shard only, then the metadata
    assert {p.name: p.read_bytes() for p in local.iterdir()} == FILES


def test_a_copy_of_another_size_than_the_bucket_lists_is_refused(bucket, tmp_path):
    remote = epath.Path("gs://bucket/data") / RELATIVE / "features.json"
    dst = tmp_path / "features.json"
    with pytest.raises(UsageError, match="gave 2 bytes, the bucket lists 3: the object changed"):
        staging._copy(remote, dst, 3)
    assert list(tmp_path.glob("features.json*")) == []  # neither the file nor a part of it
    assert staging._copy(remote, dst, 2) == 2 and dst.read_bytes() == b"{}"


def test_a_dataset_without_its_metadata_is_not_prepared(bucket, tmp_path):
    with pytest.raises(NotPrepared):
        _stage(bucket, "gs://bucket/elsewhere")
    local = tmp_path / "local"
    (local / RELATIVE).mkdir(parents=True)
    with pytest.raises(NotPrepared):
        staging.local_dataset(str(local), RELATIVE, str(bucket), NotPrepared)
    (local / RELATIVE / staging.FINISHED).write_text("{}")
    assert staging.local_dataset(str(local), RELATIVE, str(bucket), NotPrepared) == (
        local / RELATIVE
    )
    assert not bucket.exists()  # a local dataset is read where it is


def test_urls():
    assert paths.is_url("gs://bucket/x") and not paths.is_url("/data/x")


@pytest.mark.parametrize("fault", ["a file", "full"])
def test_a_stage_dir_that_cannot_take_the_copy_is_one_line(bucket, monkeypatch, fault):
    import errno

    if fault == "a file":
        bucket.write_text("not a directory")
    else:
        real_open = open

        def full_disk(path, mode="r", *a, **kw):
            if "w" in mode and ".part-" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, mode, *a, **kw)

        monkeypatch.setattr("builtins.open", full_disk)
    why = "(Not a directory|File exists)" if fault == "a file" else "the disk is full"
    with pytest.raises(UsageError, match=rf"input.stage_dir=.*could not be written .*\({why}\)"):
        _stage(bucket)


def test_data_dirs_are_read_from_local_paths_and_buckets_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.data_path("file:///data/x", "input.data_dir") == "/data/x"
    assert paths.data_path("~/x", "input.data_dir") == f"{tmp_path}/x"
    assert paths.data_path("gs://b/x", "input.data_dir") == "gs://b/x"
    with pytest.raises(UsageError, match=r"input.data_dir='hdfs://x/y': only local paths and"):
        paths.data_path("hdfs://x/y", "input.data_dir")
