"""Fuzzing (issue 7, item 6) with hypothesis: the config loader, the adapter loader, the image-folder metadata parser
and the GenEval metadata parser either accept an input (and then the result is valid) or refuse it with a
ValueError / FileNotFoundError; no other exception type may escape.

Each property runs 100 derandomized examples (reproducible in CI). The properties that currently fail are strict
regression tests that keep their minimal input as an explicit `@example` (the bugs are fixed); `COUNTS` records
how many cases each property ran (`scripts/reliability_report.py` prints the total).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from softalign import SoftTokens, SoftTokensConfig, read_soft_tokens, save_soft_tokens
from softalign.data import MAX_CAPTION_CHARS, image_folder
from softalign.eval import parse_metadata_line
from softalign.loaders import CONFIG_NAME, WEIGHTS_NAME
from softalign.softalign_config import CHOICES, SoftAlignConfig

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
COUNTS: Counter = Counter()  # examples run per property (explicit @examples included)
REFUSED = (ValueError, FileNotFoundError)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


# -- the config loader ------------------------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(SoftAlignConfig)}
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _plausible(name: str) -> st.SearchStrategy:
    """Values a user might write for the field (in and out of range), mixed with junk of any type."""
    kind = str(_FIELDS[name].type).replace(" ", "")
    if name in CHOICES:
        good = st.sampled_from(CHOICES[name])
    elif kind.startswith("int"):
        good = st.integers(-5, 2000)
    elif kind.startswith("float"):
        good = st.one_of(st.floats(-2.0, 2.0), st.sampled_from([0.0, 1e-8, 0.9999, 1.0]))
    elif kind.startswith("bool"):
        good = st.booleans()
    elif kind.startswith("list"):
        good = st.lists(st.text(max_size=10), max_size=3)
    else:
        good = st.text(max_size=10)
    if kind.endswith("None"):
        good = st.one_of(st.none(), good)
    return st.one_of(good, good, _JUNK)  # two parts plausible, one part junk


_CONFIG_DICTS = st.fixed_dictionaries({}, optional={name: _plausible(name) for name in _FIELDS}).flatmap(
    lambda known: st.dictionaries(st.text(max_size=12), _JUNK, max_size=2).map(lambda extra: {**extra, **known})
)


def _assert_valid(config: SoftAlignConfig) -> None:
    """The constraints `SoftAlignConfig` documents and enforces."""
    for name, allowed in CHOICES.items():
        assert getattr(config, name) in allowed
    for name in ("negatives_per_positive", "train_batch_size", "gradient_accumulation_steps", "chunk_size"):
        value = getattr(config, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, name
    assert config.max_steps >= 1 and config.logging_steps >= 1
    assert config.train_batch_size % (config.negatives_per_positive + 1) == 0
    assert 0 <= config.min_timestep < config.max_timestep <= 1000
    assert 0 <= config.ema_decay < 1
    assert config.learning_rate > 0 and config.temperature > 0
    assert config.save_steps >= 0 and config.sample_steps >= 0 and config.lr_warmup_steps >= 0
    assert config.resolution is None or (config.resolution >= 8 and config.resolution % 8 == 0)
    assert all(isinstance(p, str) for p in config.sample_prompts)


@FUZZ
@given(data=_CONFIG_DICTS)
def test_config_loader_builds_a_valid_config_or_raises_value_error(data):
    COUNTS["config loader"] += 1
    try:
        config = _quiet(SoftAlignConfig.from_dict, data, source="run.yaml")
    except ValueError as error:
        assert str(error)
        return
    _assert_valid(config)
    assert _quiet(SoftAlignConfig.from_dict, config.to_dict()) == config  # what `save` writes reads back the same


@FUZZ
@given(data=st.dictionaries(st.one_of(st.integers(), st.text(max_size=4), st.booleans()), _JUNK, max_size=4))
@example(data={1: 2, "x": 3})
def test_config_loader_with_keys_of_any_type(data):
    COUNTS["config loader, keys of any type"] += 1
    try:
        _quiet(SoftAlignConfig.from_dict, data)
    except ValueError:
        pass


_NON_FINITE_FIELDS = ["gamma_pos", "gamma_neg", "dweight", "weight_decay", "max_grad_norm", "learning_rate"]


@FUZZ
@given(name=st.sampled_from(_NON_FINITE_FIELDS), value=st.sampled_from([math.nan, math.inf, -math.inf]))
@example(name="gamma_pos", value=math.nan)
def test_config_loader_refuses_non_finite_numbers(name, value):
    COUNTS["config loader, non-finite numbers"] += 1
    with pytest.raises(ValueError, match=name):
        SoftAlignConfig.from_dict({name: value})


# -- the adapter loader -----------------------------------------------------------------------------------------------
@functools.cache
def _good_adapter() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=8)), Path(tmp) / "a")
        return {CONFIG_NAME: (path / CONFIG_NAME).read_bytes(), WEIGHTS_NAME: (path / WEIGHTS_NAME).read_bytes()}


def _read_adapter(files: dict[str, bytes]):
    """Write the adapter files into a fresh directory and read it: (tokens or None, error or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        try:
            return _quiet(read_soft_tokens, path), None
        except REFUSED as error:
            return None, error


def _assert_loaded_tokens_are_valid(tokens: SoftTokens) -> None:
    shapes = tokens.config.parameter_shapes()
    for name, value in tokens.state_dict().items():
        assert tuple(value.shape) == shapes[name] and value.dtype == torch.float32
        assert torch.isfinite(value).all()


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
_TOKEN_FIELDS = [f.name for f in dataclasses.fields(SoftTokensConfig)]


@st.composite
def _adapter_configs(draw):
    """A JSON value for adapter_config.json: often the good config with a few fields changed, sometimes anything."""
    good = json.loads(_good_adapter()[CONFIG_NAME])
    if draw(st.integers(0, 3)) == 0:
        return draw(_JSON)
    changes = draw(st.dictionaries(st.sampled_from([*_TOKEN_FIELDS, "format", "extra"]), _JSON, max_size=3))
    return {**good, **changes}


@FUZZ
@given(config=_adapter_configs())
def test_adapter_loader_with_random_json_config(config):
    COUNTS["adapter loader, random JSON config"] += 1
    files = {**_good_adapter(), CONFIG_NAME: json.dumps(config).encode()}
    tokens, error = _read_adapter(files)
    if tokens is not None:
        _assert_loaded_tokens_are_valid(tokens)
    else:
        assert CONFIG_NAME in str(error) or WEIGHTS_NAME in str(error), error


@FUZZ
@given(data=st.binary(max_size=200))
def test_adapter_loader_with_random_config_bytes(data):
    COUNTS["adapter loader, random config bytes"] += 1
    tokens, error = _read_adapter({**_good_adapter(), CONFIG_NAME: data})
    assert tokens is None and CONFIG_NAME in str(error)


@st.composite
def _damaged_weights(draw):
    good = _good_adapter()[WEIGHTS_NAME]
    how = draw(st.sampled_from(["random", "truncated", "flipped", "header"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if how == "header":  # a random header length and JSON header over the good data
        header = json.dumps(draw(_JSON)).encode()
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + header + good[8:]
    data = bytearray(good)
    for position in draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
        data[position] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@FUZZ
@given(weights=_damaged_weights())
def test_adapter_loader_with_random_or_damaged_safetensors(weights):
    COUNTS["adapter loader, random / damaged safetensors"] += 1
    tokens, error = _read_adapter({**_good_adapter(), WEIGHTS_NAME: weights})
    if tokens is not None:
        _assert_loaded_tokens_are_valid(tokens)
    else:
        assert WEIGHTS_NAME in str(error), error


_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool]
_DTYPES += [torch.float8_e4m3fn, torch.float8_e5m2]


@FUZZ
@given(dtype=st.sampled_from(_DTYPES))
@example(dtype=torch.float8_e4m3fn)
def test_adapter_loader_with_tensors_of_any_dtype(dtype):
    COUNTS["adapter loader, tensors of any dtype"] += 1
    shapes = SoftTokensConfig.for_family("sd15", dim=8).parameter_shapes()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: torch.zeros(s).to(dtype) for k, s in shapes.items()}, str(Path(tmp) / WEIGHTS_NAME))
        weights = (Path(tmp) / WEIGHTS_NAME).read_bytes()
    tokens, error = _read_adapter({**_good_adapter(), WEIGHTS_NAME: weights})
    assert tokens is not None or WEIGHTS_NAME in str(error)


@FUZZ
@given(depth=st.integers(1, 100_000))
@example(depth=100_000)
def test_parsers_with_deeply_nested_json(depth):
    COUNTS["parsers, deeply nested JSON"] += 1
    document = "[" * depth + "]" * depth
    for parse in (
        lambda: _read_adapter({**_good_adapter(), CONFIG_NAME: document.encode()}),
        lambda: _image_folder_from_bytes(document.encode()),
        lambda: parse_metadata_line(document),
    ):
        try:
            parse()
        except REFUSED:
            pass


# -- the image-folder metadata parser ---------------------------------------------------------------------------------
def _image_folder_from_bytes(data: bytes):
    """(examples or None, error or None) for a folder whose metadata.jsonl holds `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metadata.jsonl").write_bytes(data)
        try:
            return image_folder(tmp), None
        except REFUSED as error:
            return None, error


_VALUES = st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
_ROWS = st.one_of(
    st.fixed_dictionaries({}, optional={"file_name": _VALUES, "text": _VALUES, "extra": _VALUES}),
    _JSON,
)
_LINES = st.one_of(
    _ROWS.map(json.dumps),
    _ROWS.map(lambda row: json.dumps(row)[:-1]),  # cut short
    st.text(max_size=40).filter(lambda s: "\n" not in s),
    st.just(""),
)


@FUZZ
@given(lines=st.lists(_LINES, max_size=6))
def test_image_folder_parser_with_random_lines(lines):
    COUNTS["image-folder parser, random lines"] += 1
    examples, error = _image_folder_from_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    if examples is None:
        assert "metadata.jsonl" in str(error), error
        return
    for e in examples:
        assert isinstance(e.caption, str) and e.caption.strip() and len(e.caption) <= MAX_CAPTION_CHARS


_CAPTIONS = st.text(min_size=1, max_size=60).filter(lambda s: s.strip())


@FUZZ
@given(captions=st.lists(_CAPTIONS, min_size=1, max_size=5), names=st.lists(st.text(max_size=12), max_size=5))
def test_image_folder_parser_reads_every_valid_line_ascii_json(captions, names):
    COUNTS["image-folder parser, valid lines"] += 1
    rows = [{"file_name": (names[i] if i < len(names) else "") + f"{i}.png", "text": c} for i, c in enumerate(captions)]
    examples, error = _image_folder_from_bytes("".join(json.dumps(r) + "\n" for r in rows).encode())
    assert error is None, error
    assert [e.caption for e in examples] == captions


@FUZZ
@given(captions=st.lists(_CAPTIONS, min_size=1, max_size=5))
@example(captions=["one\u2028two"])
def test_image_folder_parser_reads_every_valid_line_utf8_json(captions):
    COUNTS["image-folder parser, valid UTF-8 lines"] += 1
    rows = [{"file_name": f"{i}.png", "text": c} for i, c in enumerate(captions)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    examples, error = _image_folder_from_bytes(data)
    assert error is None, error
    assert [e.caption for e in examples] == captions


@FUZZ
@given(data=st.binary(max_size=120))
@example(data=b"\xe9\n")
def test_image_folder_parser_with_random_bytes(data):
    COUNTS["image-folder parser, random bytes"] += 1
    examples, error = _image_folder_from_bytes(data)
    assert examples is not None or "metadata.jsonl" in str(error), error


# -- the GenEval metadata parser --------------------------------------------------------------------------------------
_CLAUSES = st.fixed_dictionaries(
    {},
    optional={
        "class": st.one_of(st.sampled_from(["dog", "cat", ""]), _JSON),
        "count": st.one_of(st.integers(-1, 5), _JSON),
        "color": st.one_of(st.sampled_from(["red", "blue"]), _JSON),
        "position": st.one_of(st.tuples(st.sampled_from(["above", "left of", "near"]), st.integers(-1, 3)), _JSON),
    },
)
_GENEVAL = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "tag": st.one_of(st.sampled_from(["counting", "position", "colors", "nope"]), _JSON),
            "include": st.one_of(st.lists(_CLAUSES, max_size=3), _JSON),
            "exclude": st.one_of(st.lists(_CLAUSES, max_size=2), _JSON),
            "prompt": st.one_of(st.text(max_size=20), _JSON),
        },
    ),
    _JSON,
)


@FUZZ
@given(line=st.one_of(_GENEVAL.map(json.dumps), st.text(max_size=40)))
def test_geneval_metadata_parser_never_crashes(line):
    COUNTS["GenEval metadata parser"] += 1
    try:
        metadata = parse_metadata_line(line, source="evaluation_metadata.jsonl", line=7)
    except ValueError as error:
        assert "evaluation_metadata.jsonl, line 7" in str(error)
        return
    assert metadata == json.loads(line)
    assert metadata["tag"] in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert all(isinstance(c["count"], int) and c["count"] >= 1 for c in metadata["include"])


# -- for the report script ----------------------------------------------------------------------------------------------
PROPERTIES = [
    test_config_loader_builds_a_valid_config_or_raises_value_error,
    test_config_loader_with_keys_of_any_type,
    test_config_loader_refuses_non_finite_numbers,
    test_adapter_loader_with_random_json_config,
    test_adapter_loader_with_random_config_bytes,
    test_adapter_loader_with_random_or_damaged_safetensors,
    test_adapter_loader_with_tensors_of_any_dtype,
    test_parsers_with_deeply_nested_json,
    test_image_folder_parser_with_random_lines,
    test_image_folder_parser_reads_every_valid_line_ascii_json,
    test_image_folder_parser_reads_every_valid_line_utf8_json,
    test_image_folder_parser_with_random_bytes,
    test_geneval_metadata_parser_never_crashes,
]
