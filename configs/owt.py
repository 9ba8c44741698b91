"""'One weird trick' AlexNet (Krizhevsky 2014; torchvision's alexnet) on ImageNet 2012.

    python launch.py --config=configs/owt.py --workdir=/tmp/owt --config.input.data_dir=...

64-192-384-256-256 convs, no LRN, one tower, 224x224 crops: 61,100,840 parameters. The input is
normalised as torchvision's is (per-channel mean and std), so torchvision's published weights
(`python -m alexnet_jax.convert_torchvision`) and a run of this config see the same inputs.
"""

import ml_collections

from configs import alexnet


def get_config() -> ml_collections.ConfigDict:
    config = alexnet.get_config()
    config.model.variant = "owt"
    config.model.towers = 1  # no grouped convolutions
    config.model.lrn = False
    config.input.image_size = 224  # conv1 is padded by 2, so 224 gives 55x55
    config.input.mean = "channel"  # torchvision's: (x - channel mean) / channel std
    config.input.divide_by_std = True
    return config
