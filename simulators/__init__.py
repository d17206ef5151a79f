"""Device simulators. Each speaks its device's real wire protocol on a pty and/or a loopback socket,
so the production driver runs unchanged against it."""
