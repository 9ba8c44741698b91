"""AlexNet on GPU nodes and TPU slices: bfloat16 compute, 256 images per device, the paper's
rate scaled to the global batch with a 5-epoch warm-up; LARS past a global batch of ~2K.

The paper's recipe (configs/alexnet.py: global batch 128, float32) leaves a modern accelerator
idle. Here each data-parallel shard takes 256 images (per_device_batch_size), so the global
batch grows with the devices, and the rate follows it (the paper's 0.01 per 128 images, linear
scaling, Goyal et al. 2017). The linear rule holds AlexNet's accuracy up to about 1-2K images;
past that, the `lars` variant (You, Gitman and Ginsburg 2017) takes layer-wise rates with a
polynomial decay. Parameters stay float32; LRN, the softmax and the loss run in float32.

One node of 8 GPUs under SLURM (global batch 2,048, rate 0.16, SGD):

    srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=64 --gpus-per-task=8 \\
        .venv/bin/python launch.py --config=configs/accelerator.py --workdir=/shared/alexnet_gpu \\
        --config.input.data_dir=~/tensorflow_datasets --config.input.loader=dali

A TPU v4-32 (16 chips, 4 hosts; global batch 4,096, LARS), the same command on every host:

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd alexnet_jax && \\
        .venv/bin/python launch.py --config=configs/accelerator.py:lars \\
        --workdir=gs://BUCKET/alexnet_v4_32 --config.input.data_dir=gs://BUCKET/tensorflow_datasets"

Expected: neither has been run; no accuracy or speed is measured for this config yet
(docs/performance.md keeps what has been). The paper's 40.7% top-1 error is the target; the
LARS papers report AlexNet without batch normalisation losing a few points at 8K images.
"""

import ml_collections

from configs import alexnet

VARIANTS = ("sgd", "lars")


def get_config(variant: str = "sgd") -> ml_collections.ConfigDict:
    """`variant`: 'sgd' (momentum SGD, global batches to ~2K) or 'lars' (past that);
    --config=configs/accelerator.py:lars picks it."""
    variant = variant or "sgd"
    if variant not in VARIANTS:
        raise ValueError(f"configs/accelerator.py:{variant}: use one of {VARIANTS}")
    config = alexnet.get_config()
    config.model.dtype = "bfloat16"  # compute; parameters and LRN stay float32
    config.per_device_batch_size = 256  # images per data-parallel shard
    config.mesh.model = 1  # both towers on each device: no all-gathers between them
    config.optimizer.warmup_epochs = 5.0  # Goyal et al. 2017; You et al. 2017
    config.log_every_steps = 50
    config.eval_every_steps = 2_500  # 4-8 epochs at a global batch of 2-4K
    config.checkpoint_every_steps = 1_000
    if variant == "sgd":
        config.optimizer.schedule = "cosine"  # to 0 at the last step, after the warm-up
    else:
        config.optimizer.name = "lars"
        config.optimizer.schedule = "poly"  # power 2, as the LARS papers decay
        # 0.15625 per 128 images: a rate of 5 at 4,096 and 10 at 8,192 under linear scaling,
        # a starting point not tuned here.
        config.optimizer.learning_rate = 0.15625
    return config
