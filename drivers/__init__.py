"""Instrument drivers. Each speaks one wire protocol and opens its port by URL, so a simulator on a pty
or a loopback socket replaces the hardware without the driver knowing."""
