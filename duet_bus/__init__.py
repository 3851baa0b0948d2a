"""duet-bus: device-cloud collaborative parameter generation (DUET) over Kafka.

`duet_bus` is what the device and the cloud share: the wire protocol, the bus,
the models, the data and the scenario runner. `devices` and `cloud` build on it.
"""

__version__ = "0.1.0"
