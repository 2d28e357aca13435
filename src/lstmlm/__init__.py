"""lstmlm: word-level LSTM and AWD-LSTM language models in PyTorch."""

from .api import LanguageModel, load
from .config import Config
from .errors import LstmlmError

__all__ = ["Config", "LanguageModel", "LstmlmError", "load"]
__version__ = "0.1.0"
