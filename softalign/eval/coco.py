"""GenEval's 80 object names and the mapping from a COCO detector's label names onto them.

GenEval's `evaluation/object_names.txt` lists COCO's 80 "thing" classes in COCO's contiguous order, spelled as
COCO spells them except three that GenEval renamed for its prompts: `computer mouse` (COCO `mouse`), `tv remote`
(`remote`) and `computer keyboard` (`keyboard`). GenEval maps detector outputs by index in this order, so a
detector's label names must be matched to it exactly, not by similarity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Other spellings of the same classes in COCO-trained checkpoints (COCO's own, Detectron2's, Pascal-style ones).
ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "hairdrier": "hair drier",
    "teddybear": "teddy bear",
    "doughnut": "donut",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "ball": "sports ball",
    "sportsball": "sports ball",
    "fridge": "refrigerator",
    "hotdog": "hot dog",
    "wineglass": "wine glass",
    "trafficlight": "traffic light",
    "firehydrant": "fire hydrant",
    "stopsign": "stop sign",
    "parkingmeter": "parking meter",
    "baseballbat": "baseball bat",
    "baseballglove": "baseball glove",
    "tennisracket": "tennis racket",
}


def _normal(name: str) -> str:
    name = re.sub(r"[\s_\-]+", " ", str(name).strip().lower())
    return ALIASES.get(name, ALIASES.get(name.replace(" ", ""), name))


def geneval_names(id2label: Mapping, source: str = "config.json") -> list[str]:
    """GenEval's name for each label index of a COCO instance-segmentation checkpoint.

    Names are matched exactly after lower-casing, `_`/`-` to spaces and the spellings in `ALIASES`; a checkpoint
    whose 80 labels are unnamed (`LABEL_0`, ...) is taken to be in COCO's contiguous order, as GenEval assumes.

    Args:
        id2label (`Mapping`): the checkpoint's `config.id2label` (index -> name).
        source (`str`, *optional*): the file to name in errors.

    Raises:
        `ValueError`: the labels are not GenEval's 80 classes (e.g. a panoptic or ADE20k checkpoint), naming what
            did not match.
    """
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    if len(labels) != len(GENEVAL_CLASSES):
        kind = {133: " (COCO panoptic: things and stuff)", 150: " (ADE20k semantic)"}.get(len(labels), "")
        raise ValueError(
            f"{source}: the checkpoint has {len(labels)} labels{kind}; expected a COCO instance-segmentation checkpoint "
            f"with GenEval's 80 object classes (e.g. a copy of facebook/mask2former-swin-small-coco-instance)"
        )
    if all(re.fullmatch(r"LABEL_\d+", str(name)) for name in labels):
        return list(GENEVAL_CLASSES)
    names = [_normal(name) for name in labels]
    unknown = [labels[i] for i, name in enumerate(names) if name not in GENEVAL_CLASSES]
    if unknown:
        raise ValueError(f"{source}: label name(s) {unknown} are not GenEval object names; expected {GENEVAL_CLASSES}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{source}: label name(s) {twice} appear more than once; expected each of the 80 once")
    return names
