"""Client-side models: federated recommendation backbones (batched over clients)."""
from .backbones import BACKBONES, Backbone, Param, make_backbone

__all__ = ["BACKBONES", "Backbone", "Param", "make_backbone"]
