"""input.skip_corrupt: the undecodable images found once, cached under the data's files, and
left out."""

import json

from conftest import write_folder
from test_sources import _cfg

from alexnet_jax import skiplist, sources


def test_the_skip_list_follows_the_files_not_their_positions(tmp_path):
    write_folder(tmp_path / "d", per_class=4, bad="2b.png")  # train/cat: 0 1 2 2b 3
    cfg = _cfg(dataset="imagefolder", data_dir=str(tmp_path / "d"))
    train = lambda: skiplist.skip_undecodable(sources.create_source(cfg), tmp_path).train
    names = lambda split: sorted(split.describe(0, k).split("/d/")[1] for k in split.epoch(0, 0, 0))
    good = [f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(4)]
    assert names(train()) == good
    # The bad image removed: nothing else is left out (indices of the old list would drop
    # train/cat/3.png, which took its place).
    (tmp_path / "d" / "train" / "cat" / "2b.png").unlink()
    assert names(train()) == good
    # A bad image added: found and left out (the old list would not know it).
    (tmp_path / "d" / "train" / "dog" / "0a.png").write_bytes(b"broken")
    assert names(train()) == good
    cached = json.loads((tmp_path / "undecodable.json").read_text())
    assert cached["train_names"] == [str(tmp_path / "d" / "train" / "dog" / "0a.png")]
    # Replaced by a good image of the same name: its size differs, so it is found again.
    (tmp_path / "d" / "train" / "dog" / "0a.png").write_bytes(
        (tmp_path / "d" / "train" / "dog" / "0.png").read_bytes()
    )
    assert len(names(train())) == len(good) + 1
