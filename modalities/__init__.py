"""Modality plugins, the shared vocabulary, and the built-in text, image and audio tokenizers.

The plugin author's import surface (docs/plugins.md):

    from omnistream.modalities import BaseModality, ModalityOptions, FilterOptions, BadSample, check_modality
"""

from omnistream.common.errors import BadSample, ConformanceError, UserError

from .base import BaseModality, FilterOptions, Modality, ModalityOptions
from .conformance import check_modality
from .vocab import BOS, EOS, PAD, Vocabulary

__all__ = [
    "BadSample",
    "BaseModality",
    "ConformanceError",
    "FilterOptions",
    "Modality",
    "ModalityOptions",
    "UserError",
    "Vocabulary",
    "check_modality",
    "PAD",
    "BOS",
    "EOS",
]
