"""The core layer: imports nothing else of ours. Readings, records, errors, the wire format, the MQTT
link, JSON and logs. Every other part depends on it."""
