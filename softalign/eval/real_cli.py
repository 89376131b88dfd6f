"""`softalign eval` on real models: GenEval's metadata, a transformers detector, CLIP colours, reward metrics.

Kept apart from `softalign/cli.py`, which only adds these flags ([`add_real_eval_args`]) and hands over to
[`run_real_eval`] when `--detector`, `--images` or `--metric` is given.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

DETECTORS = ("mask2former",)
METRICS = ("clip", "pickscore", "hps", "aesthetic", "imagereward")


def add_real_eval_args(parser: argparse.ArgumentParser) -> None:
    """Add the real-model flags (`--detector`, `--clip`, `--images`, `--metric`, ...) to `softalign eval`."""
    group = parser.add_argument_group("real models (GenEval's COCO metadata, local detector and CLIP weights)")
    group.add_argument(
        "--detector",
        help="KIND=DIR: score with a local detector instead of the shapes one; KIND is mask2former "
        "(a transformers Mask2Former COCO instance-segmentation directory).",
    )
    group.add_argument("--clip", help="Local CLIP directory for GenEval's colour classifier (ViT-L/14 as GenEval).")
    group.add_argument(
        "--images",
        help="Score this existing GenEval-layout folder (<00000>/metadata.jsonl, samples/<0000>.png) instead of "
        "generating; --model is then not needed.",
    )
    group.add_argument(
        "--protocol",
        choices=["geneval"],
        help="GenEval's generation preset (4 images per prompt, seed 42, 50 steps, guidance 9 as its script for "
        "SD1.5 / SDXL; diffusers' 28 steps and 7.0 for flow-matching SD3); overrides those flags.",
    )
    group.add_argument(
        "--metric",
        action="append",
        default=[],
        help="NAME=DIR, repeatable: also score every image with a reward model (clip, pickscore, hps, "
        "imagereward, aesthetic=CLIP_DIR); writes metrics.jsonl and metrics.json.",
    )
    group.add_argument(
        "--captions",
        help="The papers' COCO protocol: draw images for these captions (one a line, or JSONL with 'caption') "
        "and score them with --metric only (no GenEval rules).",
    )
    group.add_argument("--aesthetic-head", help="LAION aesthetic head (.pth / .safetensors) for --metric aesthetic.")
    group.add_argument("--device", help="Device for the models, e.g. cuda (default: cpu).")


def wants_real_eval(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a real-model evaluation rather than the shapes world."""
    return bool(args.detector or args.images or args.metric or args.captions)


def _detector(spec: str, device):
    kind, _, path = spec.partition("=")
    if kind not in DETECTORS or not path:
        raise ValueError(f"--detector {spec!r}: expected KIND=DIR with KIND one of {list(DETECTORS)}")
    from .mask2former import Mask2FormerDetector

    return Mask2FormerDetector.from_pretrained(path, device=device)


def _scorers(specs: list[str], head: str | None, device) -> dict:
    from ..rewards import AestheticScore, CLIPScore, HPSv2, ImageReward, PickScore

    classes = {"clip": CLIPScore, "pickscore": PickScore, "hps": HPSv2, "imagereward": ImageReward}
    scorers = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if name not in METRICS or not path:
            raise ValueError(f"--metric {spec!r}: expected NAME=DIR with NAME one of {list(METRICS)}")
        if name == "aesthetic":
            if not head:
                raise ValueError(
                    "--metric aesthetic needs --aesthetic-head FILE (LAION's sac+logos+ava1-l14-linearMSE.pth)"
                )
            scorers[name] = AestheticScore.from_pretrained(path, head, device=device)
        else:
            scorers[name] = classes[name].from_pretrained(path, device=device)
    return scorers


def _check_colours(lines, where, detector, colors) -> None:
    """Fail before any work when GenEval's rules will need colours and no CLIP was given."""
    if detector is not None and colors is None and any("color" in c for line in lines for c in line["include"]):
        raise ValueError(
            f"{where} has colors / color_attr prompts; GenEval names colours with CLIP: pass --clip DIR "
            "(e.g. a local openai/clip-vit-large-patch14)"
        )


def run_real_eval(args: argparse.Namespace, load_pipeline) -> int:
    """1. load the detector, colour CLIP and metric models (local only); 2. generate into `<out>/images` unless
    `--images` is given (resumable); 3. score with GenEval's rules (resumable); 4. reward metrics; 5. run.json.

    `load_pipeline` is the command line's loader of a local diffusers directory (passed in, so this module does not
    import the command line back)."""
    import torch

    from .geneval_folder import generate_geneval_folder, geneval_protocol, score_geneval_folder
    from .metadata import load_metadata
    from .metrics import load_captions, metrics_table, score_metrics
    from .summary import format_summary

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    detector = _detector(args.detector, args.device) if args.detector else None
    colors = None
    if args.clip:
        from .clip_colors import CLIPColorClassifier

        colors = CLIPColorClassifier.from_pretrained(args.clip, device=args.device)
    scorers = _scorers(args.metric, args.aesthetic_head, args.device)
    if detector is None and not scorers:
        raise ValueError("--images needs --detector mask2former=DIR (GenEval's rules) and/or --metric NAME=DIR")
    if args.captions and (detector is not None or not scorers):
        raise ValueError("--captions is scored with --metric NAME=DIR only (captions carry no GenEval metadata)")
    if args.captions and args.metadata:
        raise ValueError("give --captions (COCO protocol) or --metadata (GenEval), not both")
    # GenEval metadata are checked whenever GenEval's rules apply or GenEval's file is drawn; a folder scored by
    # metrics alone, or drawn from captions, needs only each prompt
    geneval = detector is not None or not (args.images or args.captions)
    run: dict = {"machine": platform.platform()}
    if args.images:
        images_dir = Path(args.images)
        if detector is not None:
            from .geneval_folder import read_geneval_folder

            _check_colours([line for line, _ in read_geneval_folder(images_dir)], images_dir, detector, colors)
    else:
        if not args.model or not (args.metadata or args.captions):
            raise ValueError(
                "generating needs --model (a local diffusers pipeline) and --metadata (GenEval's file) or --captions"
            )
        from ..loaders import load_adapters
        from .coco import GENEVAL_CLASSES
        from .detections import COLORS

        pipe = load_pipeline(args.model)
        if args.device:
            pipe.to(args.device)
        load_adapters(pipe, args.soft_tokens, args.lora)
        if args.captions:
            metadata = [{"prompt": caption} for caption in load_captions(args.captions)]
        else:
            metadata = load_metadata(args.metadata, classes=GENEVAL_CLASSES, colors=COLORS)
        if args.tags and geneval:
            metadata = [line for line in metadata if line["tag"] in set(args.tags.split(","))]
        if geneval:
            _check_colours(metadata, args.metadata, detector, colors)
        settings = {
            "images_per_prompt": args.images_per_prompt or 4,
            "seed": args.seed,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
        }
        if args.protocol == "geneval":
            settings = geneval_protocol(pipe)
        images_dir = out / "images"
        run["generation"] = generate_geneval_folder(
            pipe, metadata, images_dir, batch_size=args.batch_size, eta=args.eta, geneval=geneval, **settings
        )
        run.update(model=args.model, soft_tokens=args.soft_tokens, lora=args.lora, protocol=args.protocol)
        run["prompts"] = args.captions or args.metadata
    if detector is not None:
        title = f"GenEval rules, {detector.name} detector: {args.model or images_dir}"
        summary = score_geneval_folder(images_dir, detector, out, colors, batch_size=args.batch_size, title=title)
        run["detector"] = {"kind": args.detector.partition("=")[0], "path": args.detector.partition("=")[2]}
        run["color_classifier"] = args.clip
        print(f"{title}\n{format_summary(summary)}")
    if scorers:
        table = metrics_table(score_metrics(images_dir, scorers, out, batch_size=args.batch_size, geneval=geneval))
        (out / "metrics.md").write_text(table + "\n", encoding="utf-8")
        run["metrics"] = dict(spec.partition("=")[::2] for spec in args.metric)
        print(table)
    run["images"] = str(images_dir)
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return 0
