"""lstmlm: word-level LSTM and AWD-LSTM language models in PyTorch.

The names below load on first use, not on `import lstmlm`: importing torch takes a second or
two, and the command line (`__main__.py`) imports it inside its own Ctrl-C handling."""

import importlib

__version__ = "0.1.0"

_MODULE_OF = {"Config": "config", "LanguageModel": "api", "LstmlmError": "errors", "load": "api"}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lstmlm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__() -> list[str]:  # tab completion lists the names before their first use
    return sorted([*globals(), *_MODULE_OF])
