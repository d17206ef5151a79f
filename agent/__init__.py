"""customs-edge agent runtime: config, outbox, sync, and the wiring between drivers and apps."""
