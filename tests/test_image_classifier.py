"""The handheld's image classifiers: the API contract, accuracy on a seeded held-out set, abstention on
photographs that are too dark, blurred or not the subject, and manifests that are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from customs_edge.core.errors import ModelError
from customs_edge.models import default_manifest
from customs_edge.models.image_classifier import (
    BLURRED,
    LOW_CONFIDENCE,
    TOO_DARK,
    UNKNOWN,
    Identification,
    ImageClassifier,
)
from customs_edge.simulators import specimens
from customs_edge.training.image_classifier import evaluate


@pytest.fixture(scope="module")
def wood() -> ImageClassifier:
    return ImageClassifier.load(default_manifest("wood"))


@pytest.fixture(scope="module")
def insects() -> ImageClassifier:
    return ImageClassifier.load(default_manifest("insects"))


def photo(kind: str, label: str, seed: int) -> np.ndarray:
    """A held-out photograph as the camera would deliver it (640x480, JPEG round trip)."""
    img = (specimens.wood_image if kind == "wood" else specimens.insect_image)(label, 10_000 + seed, 640, 480)
    return np.asarray(cv2.imdecode(cv2.imencode(".jpg", img)[1], cv2.IMREAD_COLOR))


def test_the_shipped_models_cover_the_regulated_taxa(wood: ImageClassifier, insects: ImageClassifier) -> None:
    assert len(wood.labels) >= 10 and len(insects.labels) >= 6
    assert wood.status("dalbergia_nigra").cites == "I"
    for label in ("dalbergia_latifolia", "pterocarpus_santalinus", "swietenia_macrophylla"):
        assert wood.status(label).cites == "II"
    assert sum(wood.status(x).cites is None for x in wood.labels) >= 4  # unlisted look-alikes
    assert insects.status("anoplophora_glabripennis").quarantine_pest
    assert insects.status("monochamus_alternatus").quarantine_pest
    assert sum(not insects.status(x).quarantine_pest for x in insects.labels) >= 3
    # the manifests carry the simulator's ground truth, label by label
    truth = specimens.labels_json("wood") | specimens.labels_json("insects")
    for clf in (wood, insects):
        for x in clf.labels:
            assert (clf.status(x).cites, clf.status(x).quarantine_pest) == (truth[x]["cites"],
                                                                             truth[x]["quarantine_pest"])


def test_identification_contract(wood: ImageClassifier) -> None:
    ident = wood.classify(photo("wood", "dalbergia_nigra", 1))
    assert isinstance(ident, Identification)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.label = "x"  # type: ignore[misc]
    assert ident.label == "dalbergia_nigra" and ident.abstain_reason is None
    assert ident.cites == "I" and not ident.quarantine_pest and ident.alert
    assert len(ident.top3) == 3 and [p for _, p in ident.top3] == sorted((p for _, p in ident.top3), reverse=True)
    assert all(0.0 <= p <= 1.0 for _, p in ident.top3)
    assert (ident.model, ident.version) == ("wood", wood.version) and ident.ms > 0
    assert json.loads(json.dumps(ident.to_dict()))["alert"] is True


def test_an_unlisted_look_alike_is_no_alert(wood: ImageClassifier, insects: ImageClassifier) -> None:
    oak = wood.classify(photo("wood", "quercus_robur", 2))
    assert oak.label == "quercus_robur" and oak.cites is None and not oak.alert
    alb = insects.classify(photo("insects", "anoplophora_glabripennis", 2))
    assert alb.label == "anoplophora_glabripennis" and alb.quarantine_pest and alb.alert and alb.cites is None


def test_abstains_on_dark_blurred_and_off_subject_photos(wood: ImageClassifier, insects: ImageClassifier) -> None:
    good = photo("wood", "swietenia_macrophylla", 3)
    dark = wood.classify((good * 0.12).astype(np.uint8))
    assert dark.label is None and dark.abstain_reason == TOO_DARK and not dark.alert
    blurred = wood.classify(cv2.GaussianBlur(good, (0, 0), 5))
    assert blurred.label is None and blurred.abstain_reason == BLURRED
    # a beetle is not end grain, a wood section is not an insect, nor is a flat grey card or noise
    beetle = wood.classify(photo("insects", "monochamus_alternatus", 3))
    assert beetle.label is None and beetle.abstain_reason == "not end grain"
    assert insects.classify(good).abstain_reason == "not an insect"
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert wood.classify(noise).label is None
    assert wood.classify(np.full((480, 640, 3), 128, np.uint8)).label is None
    # the top-3 is kept for the lab when abstaining
    assert len(beetle.top3) == 3


def test_abstains_below_the_configured_confidence(wood: ImageClassifier) -> None:
    strict = ImageClassifier(wood.model, wood.spec.model_copy(update={"min_confidence": 1.01}))
    ident = strict.classify(photo("wood", "dalbergia_nigra", 4))
    assert ident.label is None and ident.abstain_reason == LOW_CONFIDENCE and not ident.alert


def test_a_wood_unlike_every_label_is_an_unknown_species(wood: ImageClassifier) -> None:
    """Between "not end grain" (max_ood) and a label (max_known): the subject, but no species it knows."""
    checks = wood.spec.checks.model_copy(update={"max_known": 0.0})
    tight = ImageClassifier(wood.model, wood.spec.model_copy(update={"checks": checks}))
    ident = tight.classify(photo("wood", "dalbergia_nigra", 5))
    assert ident.label is None and ident.abstain_reason == UNKNOWN and not ident.alert
    assert wood.spec.checks.max_known is not None and wood.spec.checks.max_ood is not None
    assert wood.spec.checks.max_known < wood.spec.checks.max_ood
    # woods the simulator draws but the model was never trained on: a good share is sent to the lab
    unseen = [wood.classify(photo("wood", label, k)) for label in specimens.unseen_labels("wood") for k in range(4)]
    assert sum(i.label is None for i in unseen) >= len(unseen) // 4
    assert not set(specimens.unseen_labels("wood")) & set(wood.labels)


def test_not_an_image_is_a_clear_error(wood: ImageClassifier) -> None:
    with pytest.raises(ValueError, match="uint8"):
        wood.classify(np.zeros((100, 100, 3), np.float32))
    with pytest.raises(ValueError, match="at least 16x16"):
        wood.classify(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("kind", ["wood", "insects"])
def test_heldout_accuracy(kind: str) -> None:
    """A small seeded held-out set (never the training seeds): top-1 on what is not abstained >= 0.90,
    abstain <= 10 %."""
    r = evaluate(kind, seed=7, per_class=5)
    assert r["accuracy_not_abstained"] >= 0.90, r
    assert r["abstain_rate"] <= 0.10, r
    assert len(r["confusion"]) == len(r["labels"])


@pytest.fixture
def wood_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "wood"
    shutil.copytree(default_manifest("wood").parent, dst)
    return dst


def _edit(d: Path, fn: object) -> Path:
    path = d / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)  # type: ignore[operator]
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("classifier"), "no 'classifier' block"),
    (lambda m: m["classifier"]["labels"].pop(), "classes but the manifest lists"),
    (lambda m: m["classifier"]["labels"].append(dict(m["classifier"]["labels"][0])), "unique"),
    (lambda m: m["classifier"]["labels"][0].update(cites="IV"), "cites"),
    (lambda m: m["classifier"]["input"].update(size=[224, 224]), "does not fit size"),
    (lambda m: m["classifier"].update(logits="probs"), "not a model output"),
    (lambda m: m["classifier"].update(ood="distance"), "not a model output"),
    (lambda m: m["classifier"].update(temperature=0), "temperature"),
    (lambda m: m.update(sha256="0" * 64), "sha256"),
])
def test_manifests_that_do_not_describe_the_model_are_refused(wood_dir: Path, change: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        ImageClassifier.load(_edit(wood_dir, change))


def test_a_non_classifier_model_is_refused() -> None:
    with pytest.raises(ModelError, match="classifier"):
        ImageClassifier.load(default_manifest("ore_grade"))


def test_train_command_on_a_folder_tree(tmp_path: Path) -> None:
    """`customs-edge models train insects --images DIR --out OUT` on DIR/<label>/*.jpg: a loadable model
    whose labels and statuses come from DIR/labels.json."""
    from customs_edge.cli.main import main

    data = tmp_path / "photos"
    specimens.write_dataset("insects", data, per_class=8, seed=3, size=200, workers=1)
    with pytest.raises(SystemExit) as done:
        main(["models", "train", "insects", "--images", str(data), "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    clf = ImageClassifier.load(tmp_path / "out" / "manifest.json")
    assert sorted(clf.labels) == sorted(specimens.labels("insects"))
    assert clf.status("monochamus_alternatus").quarantine_pest
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["classifier"]["temperature"] > 0 and m["classifier"]["checks"]["max_ood"] > 0


def test_train_refuses_a_label_without_regulatory_status(tmp_path: Path) -> None:
    """labels.json first, then the shipped model's labels (a console export has no labels.json); a label
    in neither is refused, never assumed unregulated."""
    from customs_edge.training.image_classifier import read_status, train

    data = tmp_path / "photos"
    specimens.write_dataset("insects", data, per_class=5, seed=3, size=64, workers=1)
    (data / "labels.json").unlink()
    status = read_status(data, specimens.labels("insects"), "insects")
    assert status["anoplophora_glabripennis"]["quarantine_pest"] is True
    shutil.copytree(data / "rhagium_inquisitor", data / "new_beetle")
    with pytest.raises(SystemExit, match=r"no regulatory status for \['new_beetle'\]"):
        train("insects", data, tmp_path / "out")
    (data / "labels.json").write_text(json.dumps({"new_beetle": {"name": "x", "cites": "IV"}}))
    with pytest.raises(SystemExit, match="cites must be"):
        train("insects", data, tmp_path / "out")
    (data / "labels.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="expected"):
        train("insects", data, tmp_path / "out")


def test_specimen_photos_are_deterministic_per_seed() -> None:
    for kind, draw in (("wood", specimens.wood_image), ("insects", specimens.insect_image)):
        label = specimens.labels(kind)[0]
        a, b, c = draw(label, 5, 96), draw(label, 5, 96), draw(label, 6, 96)
        assert a.shape == (96, 96, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(specimens.labels("wood")) >= 10 and len(specimens.labels("insects")) >= 6
