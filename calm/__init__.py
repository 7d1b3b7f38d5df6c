"""calm: Continuous Autoregressive Language Models.

Each chunk of K tokens is compressed into one continuous vector by a robust
variational autoencoder; a Transformer with a small energy-based generative
head predicts the next vector, so generation takes K times fewer steps.
"""

from calm.config import AutoencoderConfig, CALMConfig, HeadConfig, TrainConfig, TransformerConfig
from calm.errors import CalmError

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig",
    "LanguageModel",
    "load",
    "CALMConfig",
    "CalmError",
    "HeadConfig",
    "TrainConfig",
    "TransformerConfig",
    "__version__",
]


def __getattr__(name: str):
    # The model API needs torch; importing it on first use keeps `import calm` light.
    if name in ("load", "LanguageModel"):
        from calm import api

        return getattr(api, name)
    raise AttributeError(f"module 'calm' has no attribute {name!r}")
