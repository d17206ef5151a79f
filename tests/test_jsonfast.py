import json
import math

import numpy as np

from customs_edge.core.jsonfast import dumps


def test_values_an_app_may_produce_always_encode_to_valid_json() -> None:
    text = dumps({"nan": math.nan, "inf": -math.inf, "f32": np.float32(1.5), "arr": np.arange(3, dtype=np.int16),
                  "tuple": (1, 2), "obj": object(), "text": 'é"\n'})
    back = json.loads(text)
    assert back["nan"] is None and back["inf"] is None
    assert back["f32"] == 1.5 and back["arr"] == [0, 1, 2] and back["tuple"] == [1, 2]
    assert back["obj"].startswith("<object") and back["text"] == 'é"\n'
    assert " " not in dumps({"a": [1, 2]})  # compact
