"""Build and evaluate the shipped models from data the simulators generate (`customs-edge models evaluate`,
`python -m customs_edge.training.train NAME|all`)."""

# `customs-edge models evaluate NAME` runs NAME's evaluate(seed) -> dict; train.py rebuilds them.
MODELS: dict[str, str] = {
    "ore-grade": "customs_edge.training.ore_grade:evaluate",
    "fever": "customs_edge.training.fever:evaluate",
    "wood": "customs_edge.training.wood:evaluate",
    "insects": "customs_edge.training.insects:evaluate",
}
