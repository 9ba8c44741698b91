"""The paper: AlexNet on ImageNet 2012, trained as Krizhevsky, Sutskever and Hinton (2012) did.

    python -m alexnet_jax.prepare_imagenet --form=paper256 --data_dir=~/tensorflow_datasets \
        --manual_dir=DIR_WITH_THE_TWO_ILSVRC2012_TARS
    python launch.py --config=configs/alexnet.py --workdir=/tmp/alexnet \
        --config.input.data_dir=~/tensorflow_datasets --config.mesh.model=2

For one CNN the paper reports 40.7% top-1 / 18.2% top-5 error on the ILSVRC-2012 validation
set (Table 2), averaging the softmax of the ten patches (section 4.1; eval_ten_crop, or
launch.py --mode=eval, which reports both ways). The 37.5% / 17.0% of Table 1 are on the
ILSVRC-2010 test set. Expect about 90 epochs.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout and the input order all derive from it
    config.batch_size = 128  # global, over all devices and processes (section 5)
    # Many devices: 128 over 32 GPUs is 4 images each, too few to keep a GPU busy. Set this
    # instead to fix the images per data-parallel shard (a tower pair when mesh.model=2):
    # batch_size becomes this x mesh.data, and the rate follows through base_batch_size.
    config.per_device_batch_size = config_dict.placeholder(int)
    config.num_epochs = 90  # "roughly 90 cycles through the training set"
    config.num_train_steps = -1  # -1: num_epochs * train examples // batch_size
    config.log_every_steps = 100  # console line, metrics.jsonl, TensorBoard
    config.eval_every_steps = 10_000  # about one epoch at batch 128 (1,281,167 images)
    config.checkpoint_every_steps = 5_000
    config.keep_checkpoints = 3  # newest checkpoints kept in workdir/checkpoints
    # "N,M": a jax.profiler trace of steps N to M-1 in workdir/profile (TensorBoard's profile
    # tab or Perfetto); "": none.
    config.profile_steps = ""

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis; -1: the devices left after `model`
    config.mesh.model = 1  # 1: each device holds both towers; 2: one tower per device (the paper)

    # Each key is a field of alexnet_jax.model.AlexNet, which checks it: a new option is one
    # line here and one field there.
    config.model = ml_collections.ConfigDict()
    # 'paper' (2012); 'one_gpu': the paper's one-GPU comparison net (section 3.2: conv1-conv4
    # at half their kernels, one tower; needs towers=1); 'owt' (Krizhevsky 2014, torchvision)
    config.model.variant = "paper"
    config.model.num_classes = 1000
    config.model.towers = 2  # the paper's two GPU towers; 1 = the ungrouped model
    config.model.width = 1.0  # channel multiplier (channels per tower rounded to even)
    config.model.activation = "relu"  # 'relu' or 'tanh' (figure 1's comparison)
    config.model.lrn = True  # local response normalisation after conv1 and conv2 (section 3.3)
    config.model.overlap_pool = True  # 3x3 stride 2 pooling (section 3.4); False: 2x2 stride 2
    config.model.dropout_rate = 0.5  # on the outputs of fc6 and fc7 (section 4.2)
    config.model.dtype = "float32"  # compute dtype, 'float32' or 'bfloat16'; params stay float32
    # LRN and max-pooling with backward passes written for XLA (ops.py): 'auto' (per backend,
    # docs/performance.md), 'all', 'none' (JAX differentiates the plain definitions), 'lrn', 'pool'
    config.model.fast_ops = "auto"
    config.model.weight_init = "paper"  # N(0, 0.01), biases 1 in conv2,4,5, fc6,7; or 'he'

    config.input = ml_collections.ConfigDict()
    # 'imagenet2012_paper256' (ImageNet as the paper stored it: prepare_imagenet
    # --form=paper256), 'imagenet2012' (TFDS), 'imagefolder' or 'digits'
    config.input.dataset = "imagenet2012_paper256"
    config.input.data_dir = config_dict.placeholder(str)  # TFDS data_dir / image folder root
    config.input.manual_dir = config_dict.placeholder(str)  # where the ImageNet tars are
    # With data_dir=gs://...: where each host copies the paper-256 dataset once (about 37 GB
    # for ImageNet), as array_record reads local files only.
    config.input.stage_dir = "~/.cache/alexnet_jax/datasets"
    config.input.train_split = "train"
    config.input.eval_split = "validation"
    config.input.image_size = 227  # random crop side (the paper says 224; 227 fits conv1)
    config.input.resize_size = 256  # shorter side, then the central square (section 2)
    config.input.random_flip = True  # horizontal reflections (section 4.1)
    config.input.pca_lighting_std = 0.1  # std of the PCA colour shift (section 4.1); 0: off
    config.input.divide_by_std = False  # False: mean-subtracted 0-255 RGB, as the paper fed it
    # 'image': subtract the training set's mean image (section 2: "the mean activity over the
    # training set from each pixel"), the window under each crop; 'channel': its RGB mean.
    config.input.mean = "image"
    # Ship uint8 crops (4x fewer bytes) and subtract the mean, light and divide on the device,
    # inside the jitted step; False: all of it on the host, float32 batches.
    config.input.normalize_on_device = True
    config.input.eval_ten_crop = False  # True: the paper's ten patches, softmax averaged
    # 'tf.data' decodes on the host's cores; 'dali': NVIDIA DALI decodes (on the GPU where JAX
    # runs on one; pip install -e ".[dali]"), tf.data still reads and draws (dali_input.py).
    config.input.loader = "tf.data"
    # False: an image that does not decode stops the run, naming it. True: one decoding pass
    # at start finds every such image (listed in workdir/undecodable.json) and leaves it out.
    config.input.skip_corrupt = False
    config.input.shuffle_buffer = 16_384  # TFDS sources: examples in the shuffle buffer
    config.input.stats_max_images = 10_000  # images used for mean/PCA of non-ImageNet data

    config.optimizer = ml_collections.ConfigDict()
    # 'sgd': the paper's momentum SGD; 'lars': layer-wise rates (You et al. 2017) for global
    # batches past ~2K, with schedule 'poly' or 'cosine' and a warm-up.
    config.optimizer.name = "sgd"
    config.optimizer.trust_coefficient = 0.001  # 'lars': eta, the trust ratio's coefficient
    config.optimizer.learning_rate = 0.01  # section 5, for a global batch of base_batch_size
    # The rate used is learning_rate * batch_size / base_batch_size (linear scaling, Goyal et
    # al. 2017); at 128 it is the paper's. Past ~1-2K images AlexNet without batch norm loses
    # accuracy under this rule (You et al. 2017, who needed LARS there).
    config.optimizer.base_batch_size = 128
    config.optimizer.warmup_steps = 0  # linear ramp to the rate; ~5 epochs for large batches
    config.optimizer.warmup_epochs = 0.0  # > 0: the ramp in epochs instead (whatever the batch)
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.optimizer.decay_biases = False  # weight decay on kernels only (Caffe's reference)
    # 'plateau', 'step', 'constant', or (to 0 at the last step) 'poly' (power 2) or 'cosine'
    config.optimizer.schedule = "plateau"
    config.optimizer.plateau_factor = 0.1  # divide by 10 when validation error stalls
    config.optimizer.plateau_patience = 2  # evaluations without improvement before a cut
    config.optimizer.plateau_min_scale = 1e-3  # the paper's three cuts: 0.01 -> 1e-5
    config.optimizer.step_every_steps = 250_000  # 'step': multiply by step_factor this often
    config.optimizer.step_factor = 0.1
    return config
