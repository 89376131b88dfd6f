"""The project's GenEval rules against an independent NumPy re-statement of GenEval's `evaluate_images.py`.

The reference below works the way GenEval's script does: per class a float32 array of `[x0, y0, x1, y1, score]`
rows, thresholded with `array[:, 4] > 0.3` (0.9 for counting), sorted by score, capped at 16; box geometry in float32.
It is written from the published behaviour (not copied) and kept deliberately plain.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softalign.eval import Detection, evaluate_detections, relative_position
from softalign.eval.rules import above

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
F32_03 = float(np.float32(0.3))
F32_09 = float(np.float32(0.9))


def reference_relation(box_a: np.ndarray, box_b: np.ndarray) -> set[str]:
    pair = np.stack([box_a[:4], box_b[:4]]).reshape(2, 2, 2)  # float32 in, float32 all the way
    centres = pair.mean(axis=1)
    sizes = np.abs(pair[:, 1] - pair[:, 0])
    offset = centres[0] - centres[1]
    shrunk = np.maximum(np.abs(offset) - 0.1 * (sizes[0] + sizes[1]), 0) * np.sign(offset)
    if (np.abs(shrunk) < 1e-3).all():
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {
        name
        for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
        if hit
    }


def reference_verdict(objects: list[tuple[str, np.float32, tuple, str]], metadata: dict) -> tuple[bool, str]:
    """GenEval's thresholding and `evaluate()`, over float32 arrays; colours come with the objects."""
    threshold = 0.9 if metadata["tag"] == "counting" else 0.3
    kept: dict[str, list[tuple[np.ndarray, str]]] = {}
    for label in sorted({o[0] for o in objects}):
        rows = [o for o in objects if o[0] == label]
        array = np.array([[*o[2], o[1]] for o in rows], dtype=np.float32)
        order = np.argsort(array[:, 4])[::-1]
        order = order[array[order, 4] > threshold][:16]
        if len(order):
            kept[label] = [(array[i], rows[i][3]) for i in order]
    correct, reasons, groups = True, [], []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = [c for _, c in found]
                wanted = clause["color"]
                if colors.count(wanted) < count:
                    ok = False
                    tally = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(
                        f"expected {wanted} {name}>={count}, found {colors.count(wanted)} {wanted}; and {tally}"
                    )
            if "position" in clause and ok:
                relation, target = clause["position"]
                if groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for box, _ in found:
                        for other, _ in groups[target]:
                            got = reference_relation(box, other)
                            if relation not in got:
                                ok = False
                                reasons.append(
                                    f"expected {name} {relation} target, found {' and '.join(sorted(got))} target"
                                )
                                break
                        if not ok:
                            break
        correct = correct and ok
        groups.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(kept.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(kept[name])}")
    return correct, "\n".join(reasons)


def ours(objects, metadata):
    detections = [
        Detection(label, score, np.asarray(box, dtype=np.float32), color=color) for label, score, box, color in objects
    ]
    correct, reason, _ = evaluate_detections(detections, metadata)
    return correct, reason


METADATA = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {
        "tag": "two_object",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
        "prompt": "a photo of a cat and a dog",
    },
    {
        "tag": "counting",
        "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}],
        "prompt": "a photo of two cats",
    },
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    *[
        {
            "tag": "position",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a dog {relation} a cat",
        }
        for relation in ("left of", "right of", "above", "below")
    ],
    {
        "tag": "color_attr",
        "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red cat and a blue dog",
    },
]

# Scores at and around both thresholds, in float32, plus ordinary ones.
SCORES = [
    np.float32(v)
    for v in (0.1, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0)
    + (float(np.nextafter(np.float32(0.3), np.float32(1))), float(np.nextafter(np.float32(0.9), np.float32(1))))
    + (float(np.nextafter(np.float32(0.3), np.float32(0))),)
]

object_strategy = st.tuples(
    st.sampled_from(("cat", "dog")),
    st.sampled_from(SCORES),
    st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 40), st.integers(1, 40)).map(
        lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
    ),
    st.sampled_from(("red", "blue", "green")),
)


def _no_ties(objects) -> bool:
    # GenEval orders equal scores by its detector's output order; keep cases where the order is defined.
    keys = [(o[0], float(o[1])) for o in objects]
    return len(keys) == len(set(keys))


@settings(max_examples=300, deadline=None)
@given(objects=st.lists(object_strategy, max_size=8).filter(_no_ties), metadata=st.sampled_from(METADATA))
def test_rules_agree_with_geneval_on_random_float32_cases(objects, metadata):
    assert ours(objects, metadata) == reference_verdict(objects, metadata)


@pytest.mark.parametrize("metadata", METADATA, ids=lambda m: m["tag"] + ":" + m["prompt"])
def test_rules_agree_with_geneval_on_every_tag(metadata):
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(0, 6))
        objects = []
        for k in range(n):
            x, y, w, h = (int(v) for v in rng.integers(1, 40, size=4))
            label = ("cat", "dog")[int(rng.integers(2))]
            score = np.float32(rng.choice([0.2, 0.5, 0.95, 0.99]) - 1e-4 * k)
            objects.append((label, score, (x, y, x + w, y + h), ("red", "blue")[int(rng.integers(2))]))
        assert ours(objects, metadata) == reference_verdict(objects, metadata)


def test_float32_score_equal_to_float32_threshold_is_dropped():
    single = METADATA[0]
    box = (0, 0, 10, 10)
    # GenEval: np.float32(0.3) > 0.3 is False in NumPy (the threshold is rounded to float32 first)
    assert not bool(np.array([0.3], dtype=np.float32) > 0.3)
    assert reference_verdict([("cat", np.float32(0.3), box, "red")], single)[0] is False
    assert ours([("cat", np.float32(0.3), box, "red")], single)[0] is False
    assert Detection("cat", np.float32(0.3), box).precision == "float32"
    assert Detection("cat", np.float32(0.3), box).score == F32_03  # the stored value is the float32 one, exactly
    # The next float32 up is kept.
    nxt = np.nextafter(np.float32(0.3), np.float32(1))
    assert ours([("cat", nxt, box, "red")], single)[0] is True
    # The same value as a Python float (float64 precision) is above 0.3 and kept: the precision is the detector's.
    assert evaluate_detections([Detection("cat", F32_03, box)], single)[0] is True
    assert evaluate_detections([Detection("cat", F32_03, box, precision="float32")], single)[0] is False
    # A float32 tensor score counts as float32, too.
    torch = pytest.importorskip("torch")
    assert Detection("cat", torch.tensor(0.3), box).precision == "float32"
    assert evaluate_detections([Detection("cat", torch.tensor(0.3), box)], single)[0] is False


def test_float32_counting_threshold():
    counting = METADATA[2]
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10)]
    at = [("cat", np.float32(0.9), boxes[0], "red"), ("cat", np.float32(0.95), boxes[1], "red")]
    assert ours(at, counting) == reference_verdict(at, counting) == (False, "expected cat>=2, found 1")
    nxt = np.nextafter(np.float32(0.9), np.float32(1))
    up = [("cat", nxt, boxes[0], "red"), ("cat", np.float32(0.95), boxes[1], "red")]
    assert ours(up, counting) == reference_verdict(up, counting) == (True, "")


def test_above_and_relative_position_in_float32():
    assert above(F32_03, 0.3, "float32") is False
    assert above(F32_03, 0.3, "float64") is True
    assert above(F32_09, 0.9, "float32") is False
    a, b = np.array([0, 0, 10, 10], np.float32), np.array([30, 1, 40, 11], np.float32)
    assert relative_position(a, b, precision="float32") == reference_relation(a, b) == {"left of"}
    with pytest.raises(ValueError, match="precision"):
        Detection("cat", 0.5, (0, 0, 1, 1), precision="float8")
