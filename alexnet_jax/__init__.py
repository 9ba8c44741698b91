"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) in JAX/Flax, its two towers split across devices."""

from alexnet_jax.errors import UsageError
from alexnet_jax.inference import load_checkpoint
from alexnet_jax.model import AlexNet

__all__ = ["AlexNet", "UsageError", "load_checkpoint"]
