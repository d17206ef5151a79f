"""The `customs-edge` command line and the demo: the top layer, free to import every other part."""
