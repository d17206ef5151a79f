"""Device simulators. Each speaks its device's real wire protocol on a pty and/or a loopback socket,
so the production driver runs unchanged against it."""

# `customs-edge simulate NAME ...` runs NAME's main(argv); 'module:function', imported only when used.
SIMULATORS: dict[str, str] = {
    "scale": "customs_edge.simulators.scale:main",
    "ore-station": "customs_edge.simulators.ore_station:main",
    "gate": "customs_edge.simulators.gate:main",
    "camera": "customs_edge.simulators.camera:main",
    "specimens": "customs_edge.simulators.specimens:main",  # writes a photo dataset DIR/<label>/*.jpg
    "gps": "customs_edge.simulators.gps:main",
    "scanner": "customs_edge.simulators.scanner:main",
    "relay": "customs_edge.simulators.relay:main",
    "environment": "customs_edge.simulators.environment:main",
    "handheld": "customs_edge.simulators.handheld:main",
}
