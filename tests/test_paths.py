"""Paths and URLs; small files written whole or not at all."""

import pytest
from etils import epath

from alexnet_jax import paths


def test_urls_are_told_from_local_paths(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert paths.is_url("gs://bucket/x") and paths.is_url(epath.Path("gs://bucket/x"))
    assert not paths.is_url("/data/x") and not paths.is_url("~/x")
    assert paths.local_or_url("~/cache") == "/home/someone/cache"
    assert paths.local_or_url("gs://bucket/~x") == "gs://bucket/~x"


@pytest.mark.parametrize("data", ["text\n", b"\x00bytes"])
def test_a_file_is_replaced_whole(tmp_path, data):
    target = tmp_path / "stats.json"
    target.write_text("old")
    paths.write_whole(target, data)
    got = target.read_bytes()
    assert got == (data if isinstance(data, bytes) else data.encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = epath.Path(tmp_path) / "metrics.jsonl"
    target.write_text("kept\n")

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        paths.write_whole(target, "new\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "kept\n"
