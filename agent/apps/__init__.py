"""Applications: what a unit type does with its drivers' readings (aggregate, infer, decide)."""
