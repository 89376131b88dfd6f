import numpy as np
import pytest

from softalign.shapes.data import count_group
from softalign.shapes.prompts import split_prompts


def test_count_groups_are_one_class_at_distinct_counts_from_the_given_split():
    lines = split_prompts("train")
    train_prompts = {line["prompt"] for line in lines}
    rng = np.random.default_rng(0)
    classes = set()
    for _ in range(50):
        group = count_group(rng, lines)
        clauses = [line["include"][0] for line in group]
        assert all(len(line["include"]) == 1 and "color" not in line["include"][0] for line in group)
        assert len({c["class"] for c in clauses}) == 1
        assert len({c["count"] for c in clauses}) == 4
        assert {line["prompt"] for line in group} <= train_prompts
        classes.add(clauses[0]["class"])
    counts: dict[str, set] = {}
    for line in lines:
        if line["tag"] in ("single_object", "counting"):
            counts.setdefault(line["include"][0]["class"], set()).add(line["include"][0]["count"])
    assert classes == {name for name, seen in counts.items() if len(seen) >= 4}


def test_count_group_names_the_problem_when_no_class_has_enough_counts():
    lines = [line for line in split_prompts("heldout") if line["tag"] in ("single_object", "counting")]
    with pytest.raises(ValueError, match="No class has 4 different counts"):
        count_group(np.random.default_rng(0), lines)
