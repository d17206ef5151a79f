"""The officers' web console (`customs-edge console serve`): alerts with acknowledgement and disposition,
the fleet, ore lots and gate lanes, read from the hub's database; its users, sessions and audit trail in a
file of its own. Server-rendered pages and one small script served by the console itself (no CDN)."""
