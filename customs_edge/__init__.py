"""customs-edge: edge agents for smart-customs devices.

One import root. The repository keeps one top-level folder per part, and `customs_edge/` links each of
them in (a symlink per folder, so the same file is never importable under two names):

  core/        customs_edge.core        readings, records, errors, wire format, MQTT link, JSON, logs
  drivers/     customs_edge.drivers     instrument drivers; the public driver API is customs_edge.drivers.api
  models/      customs_edge.models      the ONNX runtime wrapper and the shipped models (package data)
  hub/         customs_edge.hub         the hub that stores records exactly once; brokers for tests and the demo
  simulators/  customs_edge.simulators  every device on its real wire protocol (never imports a driver)
  agent/       customs_edge.agent       the unit runtime: config, outbox, sync, apps
  training/    customs_edge.training    scripts that build and evaluate the shipped models
  cli/         customs_edge.cli         the `customs-edge` command and the demo
  configs/     customs_edge.configs     worked unit configs (package data)

Layers point one way (checked by import-linter in `make test`): core <- drivers, models, hub,
simulators <- agent <- training, cli.
"""

__version__ = "0.2.0"
