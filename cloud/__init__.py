"""The cloud side: the generator service (consume, micro-batch, generate, publish)."""

from cloud.service import CloudConfig, GeneratorService

__all__ = ["CloudConfig", "GeneratorService"]
