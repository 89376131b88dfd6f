"""GenEval's scoring rules with plug-in detectors, its result files and summary, and reports.

Score one image with [`evaluate_image`] (or [`evaluate_detections`] when detections are at hand), turn verdicts into
GenEval's rows with [`result_row`], save them with [`write_results_jsonl`], and summarise with [`summarize`],
[`format_summary`], [`markdown_report`] and [`compare`]. For real models, [`Mask2FormerDetector`] (GenEval's COCO
detector on transformers) and [`CLIPColorClassifier`] (its colour classifier) are the plug-ins; both load from
local directories only and import torch / transformers when first used.
"""

from __future__ import annotations

from .coco import GENEVAL_CLASSES
from .detections import COLORS, ColorClassifier, Detection, Detector, masked_crop
from .metadata import RELATIONS, TAGS, load_metadata, parse_metadata_line, validate_metadata
from .report import caption, compare, counting_confusion, counting_table, markdown_report, save_grid, tag_table
from .rules import GENEVAL, RuleConfig, evaluate_detections, evaluate_image, relative_position, select_objects
from .summary import (
    COLUMNS,
    format_summary,
    read_results_jsonl,
    result_row,
    summarize,
    wilson_interval,
    write_results_jsonl,
)

__all__ = [
    "COLORS",
    "COLUMNS",
    "CLIPColorClassifier",
    "ColorClassifier",
    "Detection",
    "Detector",
    "GENEVAL",
    "GENEVAL_CLASSES",
    "Mask2FormerDetector",
    "RELATIONS",
    "RuleConfig",
    "TAGS",
    "caption",
    "compare",
    "counting_confusion",
    "counting_table",
    "evaluate_detections",
    "evaluate_image",
    "format_summary",
    "load_metadata",
    "markdown_report",
    "masked_crop",
    "parse_metadata_line",
    "read_results_jsonl",
    "relative_position",
    "result_row",
    "save_grid",
    "select_objects",
    "summarize",
    "tag_table",
    "validate_metadata",
    "wilson_interval",
    "write_results_jsonl",
]

_LAZY = {"Mask2FormerDetector": ".mask2former", "CLIPColorClassifier": ".clip_colors"}


def __getattr__(name):
    # The real-model plug-ins import torch and transformers; load them only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
