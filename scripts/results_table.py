"""Evaluate every post-training stage of a table at every guidance scale, then write the paper-style table.

    python scripts/results_table.py docs/results/table-sd15.yaml --out runs/table-sd15

The spec (YAML or JSON) names the model, the evaluation and the rows:

    model: models/shapes-sd15
    tags: [counting, colors, two_object, single_object]
    images_per_tag: 300            # at least this many per tag (or images_per_prompt: N); the same for every row
    guidance_scales: [1.5, 3, 5]
    seed: 1234
    stages:
      - name: base
      - name: AGSM tokens (best)
        soft_tokens: runs/curve-agsm/adapters/step-002000
      - name: fine-tune (LoRA)
        lora: runs/ft-lora/lora/softalign

Each (stage, scale) is one `softalign eval` directory, `OUT/<stage slug>/cfg-<scale>`. A finished one is reused when
its key (weights, adapters, sampler, seed, prompts) matches and refused when it does not, so a table is resumable
after a kill, never mixes runs, and never silently overwrites an earlier report. `OUT/table.md` and
`OUT/table.json` are written last ([`softalign.eval.stage_table`]), with `OUT/grid-<tag>-cfg-<g>.png` for counting
and two_object: every stage one above the other on the same images ([`softalign.eval.side_by_side`]).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

STAGE_KEYS = {"name", "soft_tokens", "lora"}
SPEC_KEYS = {"model", "tags", "images_per_prompt", "images_per_tag", "guidance_scales", "seed", "steps", "stages"}


def read_spec(path: str) -> dict:
    """The table spec, checked: every field known, every stage named once, adapter paths present."""
    from softalign.training import read_config_file

    spec = read_config_file(path, kind="results-table")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(SPEC_KEYS)}")
    for field in ("model", "stages"):
        if field not in spec:
            raise ValueError(f"{path}: missing {field!r}")
    stages = spec["stages"]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"{path}: 'stages' must be a non-empty list of mappings with a 'name', got {stages!r}")
    for stage in stages:
        if "name" not in stage or set(stage) - STAGE_KEYS:
            raise ValueError(
                f"{path}: stage {stage!r} needs a 'name' and may have only {sorted(STAGE_KEYS - {'name'})}"
            )
        for key in ("soft_tokens", "lora"):
            if key in stage and not Path(stage[key]).exists():
                raise FileNotFoundError(f"{path}: stage {stage['name']!r}: {key} {stage[key]} does not exist")
    names = [stage["name"] for stage in stages]
    slugs = [slug(name) for name in names]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"{path}: stage names must differ (as folder names too), got {names}")
    scales = spec.get("guidance_scales", [1.5, 3, 5])
    if not isinstance(scales, list) or not scales or not all(isinstance(g, int | float) and g > 0 for g in scales):
        raise ValueError(f"{path}: 'guidance_scales' must be a list of positive numbers, got {scales!r}")
    if "images_per_prompt" in spec and "images_per_tag" in spec:
        raise ValueError(f"{path}: give images_per_prompt or images_per_tag, not both")
    plan = {key: spec[key] for key in ("images_per_prompt", "images_per_tag") if key in spec} or {"images_per_tag": 300}
    for key, value in plan.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    return {
        "model": spec["model"],
        "tags": spec.get("tags"),
        **plan,
        "guidance_scales": [float(g) for g in scales],
        "seed": int(spec.get("seed", 1234)),
        "steps": int(spec.get("steps", 20)),
        "stages": stages,
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "stage"


def eval_args(spec: dict, stage: dict, scale: float, out: Path, threads: int) -> list[str]:
    args = ["eval", "--model", spec["model"], *plan_args(spec)]
    args += ["--seed", str(spec["seed"]), "--steps", str(spec["steps"]), "--guidance-scale", f"{scale:g}"]
    args += ["--threads", str(threads), "--out", str(out)]
    if spec["tags"]:
        args += ["--tags", ",".join(spec["tags"])]
    for key in ("soft_tokens", "lora"):
        if key in stage:
            args += [f"--{key.replace('_', '-')}", str(stage[key])]
    return args


def plan_args(spec: dict) -> list[str]:
    """`softalign eval`'s plan: a fixed number per prompt, or the default plan's minimum per tag."""
    if "images_per_prompt" in spec:
        return ["--images-per-prompt", str(spec["images_per_prompt"])]
    return ["--min-images-per-tag", str(spec["images_per_tag"])]


def plan_words(spec: dict) -> str:
    if "images_per_prompt" in spec:
        return f"{spec['images_per_prompt']} images per prompt"
    return f"at least {spec['images_per_tag']} images per tag"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="YAML or JSON table spec (see above).")
    parser.add_argument("--out", required=True, help="Table directory: one eval directory per stage and scale.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from softalign.cli import main as softalign_main
    from softalign.eval.stage_table import load_run, stage_table

    spec = read_spec(args.spec)
    out = Path(args.out)
    runs = {}
    for scale in spec["guidance_scales"]:  # a whole column first: the first CFG's table is read hours before the rest
        for stage in spec["stages"]:
            run_dir = out / slug(stage["name"]) / f"cfg-{scale:g}"
            print(f"== {stage['name']}, CFG {scale:g}: {run_dir}", flush=True)
            softalign_main(eval_args(spec, stage, scale, run_dir, args.threads))
            runs[(stage["name"], scale)] = load_run(run_dir)
    names = [stage["name"] for stage in spec["stages"]]
    table = stage_table(runs, names, spec["guidance_scales"])
    header = (
        f"# Results table: `{spec['model']}`\n\nHeld-out shapes split, {plan_words(spec)}, "
        f"seed {spec['seed']}, {spec['steps']} sampler steps; the same prompts and seeds in every row. Spec: "
        f"`{args.spec}`; reproduce: `python scripts/results_table.py {args.spec} --out {args.out}`.\n\n"
    )
    (out / "table.md").write_text(header + table["markdown"] + "\n", encoding="utf-8")
    record = {"spec": spec, "rows": table["rows"]}
    (out / "table.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_grids(spec, out)
    print("\n" + table["markdown"] + f"\n\nTable: {out / 'table.md'}")
    return 0


GRID_TAGS = ("counting", "two_object")


def write_grids(spec: dict, out: Path) -> None:
    """`OUT/grid-<tag>-cfg-<g>.png`: every stage one above the other on the same held-out images."""
    from softalign.eval.side_by_side import side_by_side_grid

    for scale in spec["guidance_scales"]:
        runs = {stage["name"]: out / slug(stage["name"]) / f"cfg-{scale:g}" for stage in spec["stages"]}
        for tag in GRID_TAGS:
            if spec["tags"] and tag not in spec["tags"]:
                continue
            path = out / f"grid-{tag}-cfg-{scale:g}.png"
            try:
                side_by_side_grid(runs, path, tag=tag)
            except FileNotFoundError as error:  # cells restored from a snapshot keep no images: the grid stays
                print(f"no {path.name}: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
