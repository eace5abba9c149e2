"""mmlm: a PyTorch toolkit for multimodal language models."""

from mmlm.errors import InputError
from mmlm.inference.load import load

__version__ = "0.1.0"
__all__ = ["InputError", "__version__", "load"]
