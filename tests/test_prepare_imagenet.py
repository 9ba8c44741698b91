"""The one-time ImageNet preparation: its checks, and the TFDS build it runs (mocked)."""

import pytest
import tensorflow_datasets as tfds

from alexnet_jax import UsageError, prepare_imagenet, sources


def test_prepare_imagenet(tmp_path):
    with pytest.raises(UsageError, match="lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_val"):
        prepare_imagenet.prepare(str(tmp_path / "data"), str(tmp_path))
    for tar in sources.IMAGENET_TARS:
        (tmp_path / tar).write_bytes(b"")
    with tfds.testing.mock_data(num_examples=4):  # download_and_prepare is mocked
        assert prepare_imagenet.prepare(str(tmp_path), str(tmp_path)).name == "imagenet2012"
