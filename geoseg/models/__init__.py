"""Segmentation models: the registry, the model card and bundle format, and the architectures.

``load_model("dynamic-world")`` gives geoseg's default land-cover model (Google's Dynamic World, Apache-2.0)
as a ``GeoModel``: ``logits = m.module(m.card.normalization.apply(x))``.
"""

from geoseg.models.card import ClassInfo, ModelCard, Normalization
from geoseg.models.registry import GeoModel, get_model, list_models, load_model, narrow_state_dict, save_bundle

__all__ = [
    "list_models",
    "get_model",
    "load_model",
    "save_bundle",
    "narrow_state_dict",
    "ModelCard",
    "ClassInfo",
    "Normalization",
    "GeoModel",
]
