"""Models: backbones (static layers), dynamic layers, PPG and SWA, the UMN."""

from duet_bus.models.backbones import BACKBONES, Backbone, make_backbone, register_backbone
from duet_bus.models.dynamic import LayerWeights, StaticLayers, apply_dynamic
from duet_bus.models.ppg import PPG, PPGConfig
from duet_bus.models.umn import ModelConfig, RecModel, build_model

__all__ = [
    "BACKBONES", "Backbone", "LayerWeights", "ModelConfig", "PPG", "PPGConfig", "RecModel",
    "StaticLayers", "apply_dynamic", "build_model", "make_backbone", "register_backbone",
]
