"""The decoder Transformer as plain single-device PyTorch (no ray, deepspeed or mlflow here)."""
from .model import GPT, GPTConfig, IGNORE, attention_mask, flops_per_token, generate, loss_by_group

__all__ = ["GPT", "GPTConfig", "IGNORE", "attention_mask", "flops_per_token", "generate", "loss_by_group"]
