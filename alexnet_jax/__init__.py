"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) in JAX/Flax, its two towers split across devices.

`import alexnet_jax` loads the model only; `load_checkpoint` brings in Orbax and TensorFlow (the
input pipeline's eval transform) when it is first used.
"""

from typing import Any

from alexnet_jax.errors import UsageError
from alexnet_jax.model import AlexNet

__all__ = ["AlexNet", "UsageError", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":
        from alexnet_jax.inference import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'alexnet_jax' has no attribute {name!r}")
