"""GenEval's rules on hand-built detections: every tag, position edge cases, thresholds, the cap, order independence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from softalign.eval import (
    Detection,
    RuleConfig,
    evaluate_detections,
    evaluate_image,
    relative_position,
    select_objects,
)
from softalign.eval.detections import masked_crop


def det(label, score=0.95, box=(0, 0, 10, 10), color=None, mask=None):
    return Detection(label, score, box, mask=mask, color=color)


def single(name):
    return {"tag": "single_object", "include": [{"class": name, "count": 1}], "prompt": f"a photo of a {name}"}


def two(a, b):
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of a {a} and a {b}",
    }


def counting(name, n):
    return {
        "tag": "counting",
        "include": [{"class": name, "count": n}],
        "exclude": [{"class": name, "count": n + 1}],
        "prompt": f"a photo of {n} {name}s",
    }


def colors(name, color):
    return {"tag": "colors", "include": [{"class": name, "count": 1, "color": color}], "prompt": f"a {color} {name}"}


def position(a, relation, b):
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of a {a} {relation} a {b}",
    }


def color_attr(a, ca, b, cb):
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
        "prompt": f"a photo of a {ca} {a} and a {cb} {b}",
    }


def verdict(detections, metadata, **kwargs):
    correct, reason, _ = evaluate_detections(detections, metadata, **kwargs)
    return correct, reason


# --- single and two objects, thresholds -------------------------------------------------------------------------


def test_single_object_pass_fail_and_extra_instances():
    assert verdict([det("cat")], single("cat")) == (True, "")
    assert verdict([det("cat"), det("cat", box=(20, 20, 30, 30)), det("dog")], single("cat")) == (True, "")
    assert verdict([det("dog")], single("cat")) == (False, "expected cat>=1, found 0")


def test_threshold_is_strictly_above_0_3():
    assert verdict([det("cat", 0.3)], single("cat"))[0] is False
    assert verdict([det("cat", 0.3001)], single("cat"))[0] is True


def test_two_object_reasons_are_joined_by_newlines():
    assert verdict([det("cat"), det("dog")], two("cat", "dog")) == (True, "")
    assert verdict([], two("cat", "dog")) == (False, "expected cat>=1, found 0\nexpected dog>=1, found 0")


def test_details_are_geneval_rows_best_first():
    _, _, details = evaluate_detections(
        [det("cat", 0.5, (1, 2, 3, 4)), det("cat", 0.8), det("dog", 0.1)], single("cat")
    )
    assert details == {"cat": [[0.0, 0.0, 10.0, 10.0, 0.8], [1.0, 2.0, 3.0, 4.0, 0.5]]}


# --- counting -----------------------------------------------------------------------------------------------------


def boxes(n, y=0):
    return [(20 * i, y, 20 * i + 10, y + 10) for i in range(n)]


def test_counting_exact_and_low_scores_ignored():
    three = [det("cat", 0.95, b) for b in boxes(3)]
    low = [det("cat", 0.5, b) for b in boxes(2, y=50)]
    assert verdict(three + low, counting("cat", 3)) == (True, "")
    assert verdict(three[:2] + low, counting("cat", 3)) == (False, "expected cat>=3, found 2")
    assert verdict(three + [det("cat", 0.91, (0, 90, 5, 95))], counting("cat", 3)) == (False, "expected cat<4, found 4")


def test_low_scores_count_for_other_tags():
    # The same 0.5 detections are confident enough outside counting: here they break the exclude clause.
    not_counting = dict(counting("cat", 3), tag="two_object")
    three = [det("cat", 0.95, b) for b in boxes(3)]
    low = [det("cat", 0.5, b) for b in boxes(2, y=50)]
    assert verdict(three + low, not_counting) == (False, "expected cat<4, found 5")
    assert verdict([det("cat", 0.5)], single("cat")) == (True, "")


def test_counting_threshold_is_strict_and_applies_to_every_class():
    _, _, details = evaluate_detections(
        [det("cat", 0.9, b) for b in boxes(2)] + [det("dog", 0.5), det("dog", 0.95)], counting("cat", 2)
    )
    assert details == {"dog": [[0.0, 0.0, 10.0, 10.0, 0.95]]}


def test_cap_of_16_per_class():
    cats = [det("cat", 0.91 + 0.004 * i, (i, 0, i + 5, 5)) for i in range(20)]
    objects = select_objects(cats, "counting")
    assert [d.score for d in objects["cat"]] == sorted((d.score for d in cats), reverse=True)[:16]
    # GenEval quirk, kept: with the cap, 20 confident cats pass "exactly 16" since only 16 are ever seen.
    assert verdict(cats, counting("cat", 16)) == (True, "")
    assert verdict(cats, counting("cat", 17)) == (False, "expected cat>=17, found 16")
    assert len(select_objects(cats, "counting", RuleConfig(max_objects=18))["cat"]) == 18


# --- colours ------------------------------------------------------------------------------------------------------


def test_colors_by_count_over_the_found_objects():
    assert verdict([det("cat", color="red")], colors("cat", "red")) == (True, "")
    # only the most confident `count` objects are looked at: a less confident red cat does not help
    found = [det("cat", 0.9, color="blue"), det("cat", 0.8, (20, 0, 30, 10), color="red")]
    assert verdict(found, colors("cat", "red")) == (False, "expected red cat>=1, found 0 red; and 1 blue")
    two_cats = dict(colors("cat", "red"), include=[{"class": "cat", "count": 2, "color": "red"}])
    mixed = [det("cat", 0.9, color="blue"), det("cat", 0.8, (20, 0, 30, 10), color="red")]
    assert verdict(mixed, two_cats) == (False, "expected red cat>=2, found 1 red; and 1 red, 1 blue")
    assert verdict([det("cat")], colors("cat", "red"), color_classifier=lambda image, d: "red") == (True, "")


def test_detection_colour_takes_precedence_and_classifier_is_required_otherwise():
    calls = []

    def classifier(image, detection):
        calls.append(detection)
        return "green"

    assert verdict([det("cat", color="red")], colors("cat", "red"), color_classifier=classifier) == (True, "")
    assert calls == []
    with pytest.raises(ValueError, match="color_classifier"):
        evaluate_detections([det("cat")], colors("cat", "red"))
    with pytest.raises(ValueError, match="must return a colour name"):
        evaluate_detections([det("cat")], colors("cat", "red"), color_classifier=lambda image, d: 3)


def test_unknown_colours_are_listed_after_genevals_ten():
    found = [det("cat", 0.9, color="cyan"), det("cat", 0.8, (20, 0, 30, 10), color="white")]
    meta = dict(colors("cat", "red"), include=[{"class": "cat", "count": 2, "color": "red"}])
    assert verdict(found, meta)[1] == "expected red cat>=2, found 0 red; and 1 white, 1 cyan"


def test_color_attr_both_clauses():
    meta = color_attr("cat", "red", "dog", "blue")
    assert verdict([det("cat", color="red"), det("dog", color="blue")], meta) == (True, "")
    assert verdict([det("cat", color="red"), det("dog", color="red")], meta) == (
        False,
        "expected blue dog>=1, found 0 blue; and 1 red",
    )


def test_masked_crop_uses_grey_background_and_box():
    image = Image.new("RGB", (8, 8), "red")
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    crop = masked_crop(image, det("cat", box=(1, 1, 5, 5), mask=mask))
    assert crop.size == (4, 4)
    assert crop.getpixel((0, 0)) == (153, 153, 153) and crop.getpixel((1, 1)) == (255, 0, 0)
    with pytest.raises(ValueError, match="mask has shape"):
        masked_crop(Image.new("RGB", (4, 4)), det("cat", mask=mask))


# --- position -----------------------------------------------------------------------------------------------------


def test_relative_position_basic_and_y_down():
    b = (40, 40, 60, 60)
    assert relative_position((0, 40, 20, 60), b) == {"left of"}
    assert relative_position((80, 40, 100, 60), b) == {"right of"}
    assert relative_position((40, 0, 60, 20), b) == {"above"}  # smaller y is higher in the image
    assert relative_position((40, 80, 60, 100), b) == {"below"}


def test_relative_position_diagonal_gives_two_relations():
    assert relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}
    assert relative_position((50, 50, 60, 60), (0, 0, 10, 10)) == {"right of", "below"}
    meta_left, meta_above = position("dog", "left of", "cat"), position("dog", "above", "cat")
    diagonal = [det("cat", box=(50, 50, 60, 60)), det("dog", box=(0, 0, 10, 10))]
    assert verdict(diagonal, meta_left) == (True, "") and verdict(diagonal, meta_above) == (True, "")


def test_relative_position_touching_close_and_the_cut():
    assert relative_position((0, 0, 10, 10), (10, 0, 20, 10)) == {"left of"}  # touching still counts
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # within 0.1 of the summed widths
    assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    # offset 10, summed widths 50: revised 5, dx = 5 / 10 = 0.5 exactly, which is not beyond the cut
    assert relative_position((-2.5, 0, 22.5, 10), (-12.5, 0, 12.5, 10)) == set()
    assert relative_position((-2.4, 0, 22.6, 10), (-12.5, 0, 12.5, 10)) == {"right of"}
    # a 60-degree diagonal of point boxes: dx = 0.6, dy = 0.8
    assert relative_position((3, 4, 3, 4), (0, 0, 0, 0)) == {"right of", "below"}
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10), threshold=0.0) == {"left of"}


def test_position_verdicts_and_reasons():
    meta = position("dog", "right of", "cat")
    assert verdict([det("cat", box=(0, 0, 10, 10)), det("dog", box=(50, 0, 60, 10))], meta) == (True, "")
    assert verdict([det("cat", box=(50, 0, 60, 10)), det("dog", box=(0, 0, 10, 10))], meta) == (
        False,
        "expected dog right of target, found left of target",
    )
    # too close: GenEval's reason joins an empty set, leaving two spaces
    assert verdict([det("cat", box=(0, 0, 10, 10)), det("dog", box=(1, 0, 11, 10))], meta) == (
        False,
        "expected dog right of target, found  target",
    )
    assert verdict([det("cat", box=(50, 50, 60, 60)), det("dog", box=(0, 0, 10, 10))], meta)[1] == (
        "expected dog right of target, found above and left of target"
    )


def test_position_without_target_and_every_pair_checked():
    meta = position("dog", "right of", "cat")
    assert verdict([det("dog")], meta) == (False, "expected cat>=1, found 0\nno target for dog to be right of")
    # two targets: the dog must be right of both
    two_cats = dict(meta, include=[{"class": "cat", "count": 2}, meta["include"][1]])
    cats = [det("cat", box=(0, 0, 10, 10)), det("cat", 0.9, box=(100, 0, 110, 10))]
    assert verdict([*cats, det("dog", box=(50, 0, 60, 10))], two_cats) == (
        False,
        "expected dog right of target, found left of target",
    )
    assert verdict([*cats, det("dog", box=(150, 0, 160, 10))], two_cats) == (True, "")
    # extra, less confident cats are not targets: only the `count` found ones are
    extra = [det("cat", box=(0, 0, 10, 10)), det("cat", 0.5, box=(200, 0, 210, 10)), det("dog", box=(50, 0, 60, 10))]
    assert verdict(extra, meta) == (True, "")


def test_position_is_skipped_when_the_colour_fails():
    meta = {
        "tag": "position",
        "include": [
            {"class": "cat", "count": 1},
            {"class": "dog", "count": 1, "color": "red", "position": ["above", 0]},
        ],
        "prompt": "a red dog above a cat",
    }
    found = [det("cat", box=(0, 0, 10, 10)), det("dog", box=(0, 50, 10, 60), color="blue")]
    assert verdict(found, meta) == (False, "expected red dog>=1, found 0 red; and 1 blue")


# --- exclude ------------------------------------------------------------------------------------------------------


def test_exclude_clauses_are_ored():
    meta = {
        "tag": "single_object",
        "include": [{"class": "cat", "count": 1}],
        "exclude": [{"class": "dog", "count": 1}, {"class": "bird", "count": 2}],
        "prompt": "a cat and no dog",
    }
    assert verdict([det("cat"), det("bird")], meta) == (True, "")
    assert verdict([det("cat"), det("dog", 0.4)], meta) == (False, "expected dog<1, found 1")
    birds = [det("bird", box=b) for b in boxes(2)]
    assert verdict([det("dog"), *birds], meta) == (
        False,
        "expected cat>=1, found 0\nexpected dog<1, found 1\nexpected bird<2, found 2",
    )


# --- entry points, errors, order independence ---------------------------------------------------------------------


def test_evaluate_image_with_a_stub_detector():
    image = Image.new("RGB", (32, 32))
    assert evaluate_image(image, single("cat"), lambda im: [det("cat")])[:2] == (True, "")
    with pytest.raises(TypeError, match="detector must return a list"):
        evaluate_image(image, single("cat"), lambda im: det("cat"))
    with pytest.raises(TypeError, match="expected Detection"):
        evaluate_image(image, single("cat"), lambda im: [("cat", 0.9)])
    with pytest.raises(ValueError, match="unknown tag"):
        evaluate_image(image, dict(single("cat"), tag="nope"), lambda im: [])


def test_detection_and_config_validation():
    with pytest.raises(ValueError, match="x0 <= x1"):
        Detection("cat", 0.9, (10, 0, 0, 10))
    with pytest.raises(ValueError, match="finite"):
        Detection("cat", float("nan"), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="4 finite numbers"):
        Detection("cat", 0.9, (0, 0, 1))
    with pytest.raises(ValueError, match="max_objects"):
        RuleConfig(max_objects=0)


def test_equal_scores_are_broken_by_content_not_input_order():
    a, b = det("cat", 0.9, (0, 0, 10, 10), color="blue"), det("cat", 0.9, (5, 0, 15, 10), color="red")
    meta = colors("cat", "red")
    assert evaluate_detections([a, b], meta) == evaluate_detections([b, a], meta)
    assert verdict([a, b], meta)[0] is False  # the smaller box wins the tie, and it is blue


LABELS = ("cat", "dog")
SCORES = (0.2, 0.3, 0.5, 0.9, 0.95, 1.0)  # few values, so ties are common
METADATA = [
    single("cat"),
    two("cat", "dog"),
    counting("cat", 2),
    colors("dog", "red"),
    position("dog", "left of", "cat"),
    position("cat", "below", "dog"),
    color_attr("cat", "red", "dog", "blue"),
]

detection_strategy = st.builds(
    lambda label, score, x, y, w, h, color: Detection(label, score, (x, y, x + w, y + h), color=color),
    st.sampled_from(LABELS),
    st.sampled_from(SCORES),
    st.integers(0, 4).map(lambda v: v * 10.0),
    st.integers(0, 4).map(lambda v: v * 10.0),
    st.sampled_from((0.0, 5.0, 10.0)),
    st.sampled_from((0.0, 5.0, 10.0)),
    st.sampled_from((None, "red", "blue")),
)


def content_classifier(image, detection):  # depends only on what the detection is, like a real classifier
    return "red" if int(detection.box[0]) % 20 == 0 else "blue"


@settings(max_examples=200, deadline=None)
@given(
    detections=st.lists(detection_strategy, max_size=24),
    metadata=st.sampled_from(METADATA),
    permutation_seed=st.randoms(use_true_random=False),
)
def test_rules_never_crash_and_ignore_input_order(detections, metadata, permutation_seed):
    correct, reason, details = evaluate_detections(detections, metadata, color_classifier=content_classifier)
    assert isinstance(correct, bool) and isinstance(reason, str) and isinstance(details, dict)
    assert correct == (reason == "")
    assert all(len(rows) <= 16 for rows in details.values())
    shuffled = list(detections)
    permutation_seed.shuffle(shuffled)
    assert evaluate_detections(shuffled, metadata, color_classifier=content_classifier) == (correct, reason, details)
