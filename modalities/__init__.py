"""Modality plugins, the shared vocabulary, and the built-in text, image and audio tokenizers."""
from .base import BadSample, BaseModality, Modality, ModalityOptions, UserError
from .vocab import BOS, EOS, PAD, Vocabulary

__all__ = ["BadSample", "BaseModality", "Modality", "ModalityOptions", "UserError", "Vocabulary", "PAD", "BOS", "EOS"]
