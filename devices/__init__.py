"""The device side: agents that hold static layers and ask the cloud for dynamic ones."""

from devices.agent import DeviceAgent
from devices.fleet import Fleet, FleetConfig

__all__ = ["DeviceAgent", "Fleet", "FleetConfig"]
