"""The hub: subscribes to every unit's records, stores them once, and acknowledges them."""
