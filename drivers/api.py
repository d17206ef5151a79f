"""The public driver API: everything a third-party driver needs, from one module.

    from customs_edge.drivers.api import StreamSerialDriver, SerialPortConfig, Weight

    class AcmeConfig(SerialPortConfig):
        driver: Literal["acme-scale"] = "acme-scale"

    class AcmeScale(StreamSerialDriver):
        Config = AcmeConfig
        PRODUCES = (Weight,)
        ...

Register it with an entry point in the group `customs_edge.drivers` (`acme-scale = "acme.scale:AcmeScale"`);
`pip install` is enough. The config loader validates its section with `Config` and accepts it for
every app role that consumes one of the types in `PRODUCES`.
"""

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import (
    Ambient,
    AnalyserStatus,
    Analysis,
    Assay,
    CodeScan,
    Image,
    Passage,
    PassageHeartbeat,
    Point,
    PortalOccupancy,
    Position,
    Reading,
    ReadingError,
    Registers,
    SlaveError,
    Spectrum,
    ThermalFrame,
    Weight,
)
from customs_edge.drivers.base import (
    Driver,
    DriverConfig,
    DriverStats,
    SerialDriver,
    SerialPortConfig,
    SilenceWatch,
    StreamSerialDriver,
    open_serial,
    poll_due,
)

__all__ = [
    "Ambient",
    "AnalyserStatus",
    "Analysis",
    "Assay",
    "CodeScan",
    "Driver",
    "DriverConfig",
    "DriverFault",
    "DriverSilent",
    "DriverStats",
    "Image",
    "Passage",
    "PassageHeartbeat",
    "Point",
    "PortalOccupancy",
    "Position",
    "Reading",
    "ReadingError",
    "Registers",
    "SerialDriver",
    "SerialPortConfig",
    "SilenceWatch",
    "SlaveError",
    "Spectrum",
    "StreamSerialDriver",
    "ThermalFrame",
    "Weight",
    "open_serial",
    "poll_due",
]
