"""The decoder Transformer as plain single-device PyTorch (no ray, deepspeed or mlflow here).

`GPTConfig` lives in config.py and imports no torch; the rest is loaded on first use, so
`omnistream config show` and the CLI's help never pay for importing torch.
"""

from .config import GPTConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "IGNORE",
    "KVCache",
    "attend",
    "attention_mask",
    "flops_per_token",
    "generate",
    "loss_by_group",
]


def __getattr__(name: str):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
