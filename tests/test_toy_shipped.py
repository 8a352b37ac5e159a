"""The shipped toy models load offline through their libraries' normal loaders and do their job."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperlora.toy.render import render_sample, split_identities

TOY = Path(__file__).resolve().parents[1] / "data" / "toy"


@pytest.mark.skipif(not (TOY / "faces" / "recognizer.onnx").is_file(), reason="toy face models not shipped")
def test_shipped_face_models_load_and_tell_identities_apart():
    from insightface.model_zoo import get_model

    from hyperlora.conditioning.backends import make_face_analyzer

    recognizer = get_model(str(TOY / "faces" / "recognizer.onnx"))
    assert recognizer.taskname == "recognition" and tuple(recognizer.input_size) == (112, 112)
    analyzer = make_face_analyzer("toy")
    people = split_identities("test")[:4]
    embeddings = {}
    for identity in people:
        for index in range(2):
            image = Image.fromarray(render_sample(identity, index, seed=123).image)
            (face,) = analyzer.detect(image)
            embeddings[identity, index] = face.embedding
    same = [float(embeddings[i, 0] @ embeddings[i, 1]) for i in people]
    different = [float(embeddings[i, 0] @ embeddings[j, 1]) for i in people for j in people if i != j]
    assert min(same) > max(different), f"same {np.round(same, 2)}, different max {max(different):.2f}"
