"""The README's full results table (issue 16): train every row, pick the best checkpoints, evaluate every row.

    python recipes/full_table.py --out runs/full-sd15                   # the papers' budgets: hours, resumable
    python recipes/softalign_then_ddpo.py --full --out runs/full-sd15   # the same, from the flagship recipe
    python recipes/full_table.py --config my-budgets.yaml --out runs/quick

Rows, in this order (held-out shapes split, the same prompts and seeds in every row, each at every CFG of the sweep):
base; fine-tuning baseline (diffusion loss on the curated set, LoRA, the stage-1 steps and batch); SoftREPA tokens at
the best checkpoint and at the end; AGSM tokens (the same two); AGSM tokens + LoRA (the two-adapter mode, end);
DDPO alone (tokens + LoRA); AGSM then DDPO; AGSM alongside DDPO (the AGSM term added at every DDPO step); AGSM then
Diffusion-DPO; DDPO alone and AGSM then DDPO again on the training split's counting prompts only. The RL rows start
from the AGSM tokens' end checkpoint (`rl.start_from`).

Every row is trained by an existing entry point's `main(argv)`, in this process: `scripts/stage1_curve.py` (the four
stage-1 curves), `recipes/ddpo.py` (DDPO alone, AGSM then DDPO) and `recipes/softalign_then_ddpo.py --stage1-from`
(alongside, and Diffusion-DPO: its pairs are sampled at the shapes CFG). Each run writes into `OUT/rows/<run>/`;
a stage-1 curve gives two rows (best and end; one when its best point is its last). Budgets:
`recipes/configs/full_table/sd15.yaml` (every key checked).

Rows in parallel: `--rows agsm-tokens --threads 1` in one shell and `--rows softrepa-tokens --threads 1` in another
train those runs only and stop; a last run without `--rows` skips every finished run and builds the table. The RL
runs start from the AGSM curve, so they wait for it. `--table-so-far` trains nothing and scores base and every
finished run now, into the cells the last run reuses: the table's evaluation is hours too (every row at every CFG),
so a core that waits for the last runs can start on it.

Resumable: a run ends with `OUT/rows/<run>/done.json` (written last, atomically: the entry point and argv it ran, with
OUT written as `$OUT`). A run with one is skipped; one whose argv differs from what the config asks now is refused
(rather than mixing runs in one table): restore the config, or move the run's directory away to retrain it. A killed
stage-1 curve continues from its last checkpoint; a killed RL run (those entry points do not resume) restarts.

Best checkpoint: the curve point after step 0 with the highest held-out counting accuracy in `curve.json`; a tie goes
to the earlier step (the same accuracy for fewer steps). The curves draw the table's held-out prompts (fewer images,
and other seeds: an image's seed counts the prompt's place in the plan), so a "best" row is selected on the prompts
it is reported on, though not on the same images (an optimistic reading, as the papers pick checkpoints); the "end" rows
are not selected. `OUT/curves.png` draws the stage-1 curves so far on shared panels (redrawn whenever the driver
stops). Finally `OUT/table-spec.yaml` is written and `scripts/results_table.py` evaluates it into
`OUT/table/` (`table.md`, `table.json`; each cell a keyed, resumable `softalign eval` directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "full_table" / "sd15.yaml"

# The papers' scale; recipes/configs/full_table/sd15.yaml spells every key out with its reason.
DEFAULTS = {
    "model": "models/shapes-sd15",
    "threads": 2,
    "seed": 0,
    "guidance_scale": 1.5,  # CFG of the curves' evaluations and of RL sampling (the shapes models are trained at 1.5)
    "sample_steps": 20,  # sampler steps everywhere: curves, RL sampling, the table
    "stage1": {
        "max_steps": 5000,
        "eval_every": 500,
        "learning_rate": 1e-3,
        "train_batch_size": 8,
        "negatives": 3,
        "ema_decay": 0.999,
        "lora_rank": 4,
        "finetune_learning_rate": 3e-4,
        "images": 4096,
        "resolution": 64,
        "count_groups": 0.0,
        "n_tokens": 16,
        "unet_blocks": "down,mid,up",
        "curve_tags": ["counting", "colors", "two_object"],
        "curve_images_per_tag": 150,
    },
    "rl": {
        "start_from": "end",
        "ddpo_epochs": 25,
        "learning_rate": 3e-3,
        "batch_size": 16,
        "train_batch_size": 4,
        "alongside_weight": 0.5,
        "dpo_epochs": 50,
        "flagship_eval_images_per_tag": 1,
    },
    "table": {
        "tags": ["counting", "colors", "two_object", "single_object"],
        "images_per_tag": 300,
        "guidance_scales": [1.5, 3.0, 5.0],
        "seed": 1234,
    },
}
MAY_BE_ZERO = {"seed", "count_groups", "ema_decay", "n_tokens"}  # every other number must be positive
RL_LORA_RANK = 4  # the flagship's stage 2 always trains rank 4; recipes/ddpo.py is given the same


STAGE1_SLUGS = ["softrepa-tokens", "agsm-tokens", "agsm-lora", "fine-tune"]  # run directories under OUT/rows/
RL_SLUGS = [
    "ddpo",
    "agsm-then-ddpo",
    "agsm-alongside-ddpo",
    "agsm-then-dpo",
    "ddpo-counting",
    "agsm-then-ddpo-counting",
]


class RunMismatch(RuntimeError):
    """A finished (or started) run was made with other arguments than the config asks for now."""


# -- the config -------------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict:
    """The budgets: `DEFAULTS` with the file on top, every key known and of the default's type."""
    from softalign.training import read_config_file

    config = merge(DEFAULTS, read_config_file(path, kind="full-table"), str(path), "")
    check_meaning(config, str(path))
    return config


def merge(defaults: dict, given, path: str, prefix: str) -> dict:
    if not isinstance(given, dict):
        raise ValueError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {[prefix + key for key in unknown]}; expected some of "
            f"{[prefix + key for key in defaults]}"
        )
    merged = {}
    for key, default in defaults.items():
        value, name = given.get(key, default), prefix + key
        if isinstance(default, dict):
            merged[key] = merge(default, value, path, name + ".")
        elif isinstance(default, list):
            if not isinstance(value, list) or not value:
                raise ValueError(f"{path}: {name} must be a non-empty list, got {value!r}")
            merged[key] = [checked(item, default[0], path, name) for item in value]
        else:
            merged[key] = checked(value, default, path, name)
    return merged


def checked(value, default, path: str, name: str):
    """`value` in the default's type (an int is a fine float); numbers other than seeds and shares must be > 0."""
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{path}: {name} must be text, got {value!r}")
        return value
    wanted = int if isinstance(default, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{path}: {name} must be {'an integer' if wanted is int else 'a number'}{hint}, got {value!r}")
    may_be_zero = name.rsplit(".", 1)[-1] in MAY_BE_ZERO
    if value < 0 or (value == 0 and not may_be_zero):
        raise ValueError(f"{path}: {name} must be {'>= 0' if may_be_zero else 'positive'}, got {value!r}")
    return type(default)(value)


def check_meaning(config: dict, path: str) -> None:
    """What the types cannot say: the choices, and what the rows rely on."""
    from softalign.shapes.prompts import parse_tags
    from softalign.soft_tokens import UNET_BLOCK_GROUPS

    stage1, rl = config["stage1"], config["rl"]
    if stage1["max_steps"] % stage1["eval_every"]:
        raise ValueError(f"{path}: stage1.eval_every must divide stage1.max_steps (the end row is the last point)")
    if "counting" not in stage1["curve_tags"]:
        raise ValueError(f"{path}: stage1.curve_tags must include counting (the best checkpoint is chosen on it)")
    if stage1["train_batch_size"] % (stage1["negatives"] + 1):
        raise ValueError(f"{path}: stage1.train_batch_size must be a multiple of stage1.negatives + 1 (the groups)")
    if not 0 <= stage1["count_groups"] <= 1 or not 0 <= stage1["ema_decay"] < 1:
        raise ValueError(f"{path}: stage1.count_groups must lie in [0, 1] and stage1.ema_decay in [0, 1)")
    blocks = [name for name in stage1["unet_blocks"].split(",") if name]
    if any(name not in UNET_BLOCK_GROUPS for name in blocks) or len(set(blocks)) != len(blocks):
        raise ValueError(
            f"{path}: stage1.unet_blocks must be distinct names of {list(UNET_BLOCK_GROUPS)} joined by commas "
            f"(or empty: the objective's own), got {stage1['unet_blocks']!r}"
        )
    if rl["start_from"] not in ("best", "end"):
        raise ValueError(f"{path}: rl.start_from must be best or end, got {rl['start_from']!r}")
    for section, key in (("stage1", "curve_tags"), ("table", "tags")):
        try:
            parse_tags(",".join(config[section][key]))
        except ValueError as error:
            raise ValueError(f"{path}: {section}.{key}: {error}") from None


def check_model(config: dict, path: str) -> None:
    """Before hours of training: the model is a pipeline directory, and UNet blocks are only asked of a UNet."""
    index = Path(config["model"]) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: model {config['model']!r} is not a diffusers pipeline directory (no {index})")
    if config["stage1"]["unet_blocks"] and "unet" not in json.loads(index.read_text(encoding="utf-8")):
        raise ValueError(
            f"{path}: stage1.unet_blocks is {config['stage1']['unet_blocks']!r}, but {config['model']} has no UNet "
            '(a transformer family places its tokens per block by its own layout): set unet_blocks: ""'
        )


# -- runs -------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training: an entry point's `main(argv)`, writing into `OUT/rows/<slug>/`."""

    slug: str
    title: str
    entry: str  # relative to the repository root
    argv: list[str]
    resumes: bool  # the entry point continues a killed run itself (the stage-1 curves)
    files: dict = field(default_factory=dict)  # YAML files written into the run directory first (name -> mapping)

    def request(self, out: Path) -> dict:
        """What `done.json` records: enough to tell whether a finished run is the one asked for now. Not the thread
        count: how many cores ran a row does not change what it is (a row may be continued on another machine)."""
        argv = [relative(arg, out) for arg in self.argv]
        at = argv.index("--threads") if "--threads" in argv else None
        if at is not None:
            del argv[at : at + 2]
        return {"entry": self.entry, "argv": argv, "files": self.files}


def relative(arg: str, out: Path) -> str:
    """`arg` with the output directory written as `$OUT`, so that a table may be moved or named another way."""
    root = str(out)
    if arg == root or arg.startswith(root + os.sep):
        return "$OUT" + arg[len(root) :]
    return arg


def common(config: dict) -> list[str]:
    return ["--model", config["model"], "--seed", str(config["seed"]), "--threads", str(config["threads"])]


def token_layout(config: dict) -> list[str]:
    """`--n-tokens` / `--unet-blocks` for every run that makes new tokens, so that each token row (and DDPO alone)
    trains the same layout; 0 and "" leave the family's own."""
    s = config["stage1"]
    layout = ["--n-tokens", str(s["n_tokens"])] if s["n_tokens"] else []
    return layout + (["--unet-blocks", s["unet_blocks"]] if s["unet_blocks"] else [])


def stage1_runs(config: dict, out: Path) -> list[Run]:
    """The four stage-1 curves: SoftREPA and AGSM tokens, AGSM tokens + LoRA, and the diffusion-loss LoRA."""
    s = config["stage1"]
    base = [
        *common(config),
        *("--max-steps", str(s["max_steps"]), "--eval-every", str(s["eval_every"])),
        *("--train-batch-size", str(s["train_batch_size"]), "--negatives", str(s["negatives"])),
        *("--ema-decay", str(s["ema_decay"]), "--count-groups", str(s["count_groups"])),
        *("--images", str(s["images"]), "--resolution", str(s["resolution"])),
        *("--tags", ",".join(s["curve_tags"]), "--images-per-tag", str(s["curve_images_per_tag"])),
        *("--guidance-scale", str(config["guidance_scale"]), "--steps", str(config["sample_steps"])),
        *("--eval-seed", str(config["table"]["seed"])),
    ]
    tokens_lr = ["--learning-rate", str(s["learning_rate"]), *token_layout(config)]
    rank = ["--lora-rank", str(s["lora_rank"])]
    finetune_lr = str(s["finetune_learning_rate"])
    runs = [
        ("softrepa-tokens", "SoftREPA tokens", ["--objective", "softrepa", *tokens_lr]),
        ("agsm-tokens", "AGSM tokens", ["--objective", "agsm", *tokens_lr]),
        ("agsm-lora", "AGSM tokens + LoRA", ["--objective", "agsm", "--with-lora", *rank, *tokens_lr]),
        # the baseline: the same data, steps and batch, the plain diffusion loss on a LoRA (its own learning rate)
        ("fine-tune", "fine-tune", ["--objective", "diffusion", "--train-lora", *rank, "--learning-rate", finetune_lr]),
    ]
    return [
        Run(slug, title, "scripts/stage1_curve.py", [*base, *extra, "--out", str(out / "rows" / slug)], resumes=True)
        for slug, title, extra in runs
    ]


def agsm_start(config: dict, out: Path) -> Path:
    """The AGSM tokens the RL rows start from: the finished curve's `rl.start_from` point."""
    folder = out / "rows" / "agsm-tokens"
    return adapters(folder, checkpoints(folder)[config["rl"]["start_from"]]) / "adapter"


COUNTING = ["--tags", "counting"]  # recipes/ddpo.py: sample training-split prompts of this tag only


def rl_runs(config: dict, out: Path, agsm_adapter: Path) -> list[Run]:
    """DDPO alone and the RL rows that start from the AGSM tokens, all on the same DDPO settings (the last two on
    counting prompts only)."""
    s, rl = config["stage1"], config["rl"]
    sampling = ["--sample-steps", str(config["sample_steps"]), "--guidance-scale", str(config["guidance_scale"])]
    ddpo = [*common(config), *sampling, "--train-lora", "--lora-rank", str(RL_LORA_RANK)]
    ddpo += ["--epochs", str(rl["ddpo_epochs"]), "--learning-rate", str(rl["learning_rate"])]
    ddpo += ["--batch-size", str(rl["batch_size"]), "--train-batch-size", str(rl["train_batch_size"])]
    # The flagship fixes DDPO's batches and the stage-1 trainer's objective in code; its --config file sets them to
    # this table's, so that "alongside" differs from "then" only by the AGSM term, and that term is the curve's.
    term = {
        "train_batch_size": s["train_batch_size"],
        "negatives_per_positive": s["negatives"],
        "ema_decay": s["ema_decay"],
    }
    batches = {"sample_batch_size": rl["batch_size"], "train_batch_size": rl["train_batch_size"]}
    flagship = [*common(config), *sampling, "--objective", "agsm", "--stage1-from", str(agsm_adapter)]
    flagship += ["--stage1-images", str(s["images"]), "--count-groups", str(s["count_groups"])]
    flagship += ["--stage2-lr", str(rl["learning_rate"])]
    flagship += ["--eval-images-per-tag", str(rl["flagship_eval_images_per_tag"])]  # its own reports, not the table's

    def row(slug: str, title: str, entry: str, argv: list[str], files: dict | None = None) -> Run:
        folder = out / "rows" / slug
        if files:
            argv = [*argv, "--config", str(folder / "flagship.yaml")]
        return Run(slug, title, entry, [*argv, "--out", str(folder)], resumes=False, files=files or {})

    return [
        row("ddpo", "DDPO alone", "recipes/ddpo.py", [*ddpo, *token_layout(config)]),  # new tokens: the curves'
        row("agsm-then-ddpo", "AGSM then DDPO", "recipes/ddpo.py", [*ddpo, "--soft-tokens", str(agsm_adapter)]),
        row(
            "agsm-alongside-ddpo",
            "AGSM alongside DDPO",
            "recipes/softalign_then_ddpo.py",
            [*flagship, "--stage2", "ddpo", "--stage2-epochs", str(rl["ddpo_epochs"])]
            + ["--alongside", str(rl["alongside_weight"])],
            {"flagship.yaml": {"softalign": term, "stage2_config": batches}},
        ),
        row(
            "agsm-then-dpo",
            "AGSM then Diffusion-DPO",
            "recipes/softalign_then_ddpo.py",
            [*flagship, "--stage2", "diffusion_dpo", "--stage2-epochs", str(rl["dpo_epochs"])],  # 10 steps an epoch
            {"flagship.yaml": {"softalign": term}},
        ),
        # The same two on the training split's counting prompts only: tag-uniform DDPO's reward stayed flat for 25
        # epochs on shapes-sd15 v3, and the headline tag is counting (docs/results/full-table-sd15).
        row("ddpo-counting", "DDPO alone, counting", "recipes/ddpo.py", [*ddpo, *COUNTING, *token_layout(config)]),
        row(
            "agsm-then-ddpo-counting",
            "AGSM then DDPO, counting",
            "recipes/ddpo.py",
            [*ddpo, *COUNTING, "--soft-tokens", str(agsm_adapter)],
        ),
    ]


def train(run: Run, out: Path) -> bool:
    """Run `run` unless its `done.json` says it is finished; True when it trained. Refuses a run made otherwise."""
    import yaml

    folder = out / "rows" / run.slug
    request = run.request(out)
    for marker in ("done.json", "started.json"):
        path = folder / marker
        if path.is_file():
            recorded = json.loads(path.read_text(encoding="utf-8"))["request"]
            if recorded != request:
                raise RunMismatch(
                    f"row {run.title!r} ({folder}): {marker} records another run ({differences(recorded, request)}). "
                    "Refusing to mix runs in one table: restore the config it was made with, or move the directory "
                    "away to retrain this row."
                )
            if marker == "done.json":
                print(f"== {run.title}: done, skipped ({path})", flush=True)
                return False
            if not run.resumes:  # a killed RL run: its entry point would not resume, and its files would clash
                shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "started.json", {"request": request})
    for name, content in run.files.items():
        (folder / name).write_text(yaml.safe_dump(content, sort_keys=True), encoding="utf-8")
    print(f"\n== {run.title}: python {run.entry} {shlex.join(run.argv)}", flush=True)
    code = entry_point(run.entry).main(list(run.argv))
    if code not in (0, None):
        raise RuntimeError(f"row {run.title!r}: {run.entry} exited with {code}")
    write_json(folder / "done.json", {"request": request})  # last: the run is finished only once this exists
    return True


def differences(recorded: dict, request: dict) -> str:
    """The flags whose values differ, e.g. `--max-steps 5000 -> 3000`."""

    def flags(argv: list[str]) -> dict:
        pairs, key = {}, None
        for arg in argv:
            if arg.startswith("--"):
                key = arg
                pairs[key] = True
            elif key is not None:
                pairs[key], key = arg, None
        return pairs

    before, now = flags(recorded.get("argv", [])), flags(request["argv"])
    changed = [
        f"{key} {before.get(key, '(absent)')} -> {now.get(key, '(absent)')}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if recorded.get("entry") != request["entry"]:
        changed.insert(0, f"entry: {recorded.get('entry')} -> {request['entry']}")
    if recorded.get("files") != request["files"]:
        changed.append(f"files: {recorded.get('files')} -> {request['files']}")
    return "; ".join(changed) or "the same flags in another order"


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or the next run after a kill) sees the old file or the whole new one."""
    from softalign.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


_MODULES: dict[str, object] = {}


def entry_point(entry: str):
    """The module of a script or recipe (neither folder is a package), loaded once."""
    if entry not in _MODULES:
        name = "full_table_" + Path(entry).stem
        spec = importlib.util.spec_from_file_location(name, ROOT / entry)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[entry] = module
    return _MODULES[entry]


def plot_stage1(config: dict, out: Path) -> Path | None:
    """`OUT/curves.png`: every stage-1 curve so far on shared panels (held-out accuracy per curve tag, and the
    over-count rate), a line per run, so the objectives can be read against each other as they train."""
    from softalign.curves import plot_curves

    runs = {run.slug: run.title for run in stage1_runs(config, out)}
    found = {slug: out / "rows" / slug / "curve.json" for slug in runs}
    points = {slug: json.loads(path.read_text())["points"] for slug, path in found.items() if path.is_file()}
    if not points:
        return None
    panels = {}
    for key in (*config["stage1"]["curve_tags"], "over_count_rate"):
        title = "counting over-count rate" if key == "over_count_rate" else f"held-out {key}"
        panels[title] = {
            runs[slug]: [{"step": p["step"], "value": p[key]} for p in curve if p.get(key) is not None]
            for slug, curve in points.items()
        }
    staging = out / "curves.partial.png"  # two --rows processes may draw it at once: each replaces it whole
    plot_curves(panels, staging)
    os.replace(staging, out / "curves.png")
    return out / "curves.png"


# -- the table --------------------------------------------------------------------------------------------------------
def checkpoints(folder: Path) -> dict[str, int]:
    """`best` and `end` steps of a finished curve (see the docstring for the rule)."""
    points = [p for p in json.loads((folder / "curve.json").read_text())["points"] if p["step"] > 0]
    best = max(points, key=lambda p: (p["counting"], -p["step"]))  # ties: the earlier step
    return {"best": best["step"], "end": max(p["step"] for p in points)}


def adapters(folder: Path, step: int) -> Path:
    return folder / "adapters" / f"step-{step:06d}"


def finished(out: Path) -> list[str]:
    """The runs whose `done.json` exists, in the table's order."""
    return [slug for slug in STAGE1_SLUGS + RL_SLUGS if (out / "rows" / slug / "done.json").is_file()]


def unfinished(out: Path) -> list[str]:
    done = finished(out)
    return [slug for slug in STAGE1_SLUGS + RL_SLUGS if slug not in done]


def table_stages(config: dict, out: Path, picks: dict[str, dict[str, int]]) -> list[dict]:
    """The spec's stages (name, soft_tokens, lora), in the README's row order; a curve without picks, or an RL run
    without `done.json`, is left out (the table so far)."""
    rows, done = out / "rows", finished(out)

    def curve(slug: str, title: str, which: str, lora: str | None = None, label: str | None = None) -> dict | None:
        if slug not in picks:
            return None
        step = picks[slug][which]
        saved = adapters(rows / slug, step)
        stage = {"name": f"{title}, {label or which} (step {step})"}
        if (saved / "adapter" / "adapter_config.json").is_file():
            stage["soft_tokens"] = str(saved / "adapter")
        if lora:
            stage["lora"] = str(saved / "lora" / lora)
        return stage

    def best_and_end(slug: str, title: str) -> list[dict | None]:
        """Two rows, or one when the best point is the last (the same adapter scored twice would say nothing)."""
        if slug in picks and picks[slug]["best"] == picks[slug]["end"]:
            return [curve(slug, title, "end", label="best = end")]
        return [curve(slug, title, "best"), curve(slug, title, "end")]

    def rl(slug: str, title: str, tokens: str) -> dict | None:
        if slug not in done:
            return None
        return {
            "name": title,
            "soft_tokens": str(rows / slug / tokens),
            "lora": str(rows / slug / "lora" / "softalign"),
        }

    stages = [
        {"name": "base"},
        curve("fine-tune", "fine-tune (diffusion loss, LoRA)", "end", lora="softalign"),
        *best_and_end("softrepa-tokens", "SoftREPA tokens"),
        *best_and_end("agsm-tokens", "AGSM tokens"),
        curve("agsm-lora", "AGSM tokens + LoRA", "end", lora="softalign_pos"),  # the matched pair draws
        rl("ddpo", "DDPO alone (tokens + LoRA)", "adapter"),
        rl("agsm-then-ddpo", f"AGSM ({config['rl']['start_from']}) then DDPO", "adapter"),
        rl("agsm-alongside-ddpo", f"AGSM ({config['rl']['start_from']}) alongside DDPO", "adapter-stage2"),
        rl("agsm-then-dpo", f"AGSM ({config['rl']['start_from']}) then Diffusion-DPO", "adapter-stage2"),
        rl("ddpo-counting", "DDPO alone on counting prompts (tokens + LoRA)", "adapter"),
        rl("agsm-then-ddpo-counting", f"AGSM ({config['rl']['start_from']}) then DDPO on counting prompts", "adapter"),
    ]
    return [stage for stage in stages if stage is not None]


def write_spec(config: dict, stages: list[dict], path: Path) -> None:
    import yaml

    table = config["table"]
    spec = {
        "model": config["model"],
        "tags": table["tags"],
        "images_per_tag": table["images_per_tag"],
        "guidance_scales": table["guidance_scales"],
        "seed": table["seed"],
        "steps": config["sample_steps"],
        "stages": stages,
    }
    text = yaml.safe_dump(spec, sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a resumed table leaves it as it was
        path.write_text(text, encoding="utf-8")


def provenance(stages: list[dict], runs: list[Run], out: Path) -> str:
    """The section appended to table.md: which run made each row, and the best-checkpoint rule."""
    lines = ["", "## How each row was made", ""]
    lines += [
        "Run directories under `OUT/rows/`; each run's `done.json` holds the entry point and argv it ran. Best: the "
        "curve point after step 0 with the highest held-out counting accuracy in `curve.json` (ties: the earlier "
        "step), selected on the held-out split the table reports; end: the last point.",
        "",
        "| stage | run | entry point |",
        "|---|---|---|",
    ]
    by_folder = {str(out / "rows" / run.slug): run for run in runs}
    for stage in stages:
        path = stage.get("soft_tokens") or stage.get("lora")
        run = next((r for folder, r in by_folder.items() if path and path.startswith(folder + os.sep)), None)
        lines.append(f"| {stage['name']} | {f'`{run.slug}`' if run else '–'} | {f'`{run.entry}`' if run else '–'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML budgets (every key is checked).")
    parser.add_argument("--out", required=True, help="Table directory: rows/, table-spec.yaml, table/.")
    parser.add_argument(
        "--rows",
        help=f"Comma-separated runs to train, of {STAGE1_SLUGS + RL_SLUGS}, then stop (no table): one process per "
        "core, each on its own rows. The RL runs need agsm-tokens finished.",
    )
    parser.add_argument(
        "--table-so-far",
        action="store_true",
        help="Train nothing: score base and every finished run into OUT/table/ now, in the cells the full table "
        "reuses (a core that would otherwise wait for the last runs).",
    )
    parser.add_argument("--threads", type=int, help="Torch threads of this process (default: the config's threads).")
    args = parser.parse_args(argv)
    if args.rows and args.table_so_far:
        parser.error("--rows trains, --table-so-far only scores: give one")
    try:
        config = read_config(args.config)
    except ValueError as error:
        parser.error(str(error))
    wanted = args.rows.split(",") if args.rows else STAGE1_SLUGS + RL_SLUGS
    unknown = sorted(set(wanted) - set(STAGE1_SLUGS + RL_SLUGS))
    if unknown:
        parser.error(f"--rows: unknown run(s) {unknown}; expected some of {STAGE1_SLUGS + RL_SLUGS}")
    if args.threads is not None:
        config["threads"] = args.threads
    try:
        check_model(config, args.config)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = stage1_runs(config, out)
    if args.table_so_far:
        done = finished(out)
        runs += rl_runs(config, out, agsm_start(config, out)) if "agsm-tokens" in done else []
        picks = {slug: checkpoints(out / "rows" / slug) for slug in STAGE1_SLUGS if slug in done}
        return score(config, out, runs, picks)
    for run in runs:
        if run.slug in wanted:
            train(run, out)
    if any(slug in wanted for slug in RL_SLUGS) and not (out / "rows" / "agsm-tokens" / "done.json").is_file():
        parser.error("the RL runs start from the AGSM tokens: train agsm-tokens first (--rows agsm-tokens)")
    if not args.rows or any(slug in wanted for slug in RL_SLUGS):
        start = agsm_start(config, out)
        for run in rl_runs(config, out, start):
            runs.append(run)
            if run.slug in wanted:
                train(run, out)
    plot_stage1(config, out)
    if args.rows:
        left = unfinished(out)
        print(f"\nTrained {wanted}; not finished yet: {left or 'none'} (the table needs every run).", flush=True)
        return 0
    return score(config, out, runs, {slug: checkpoints(out / "rows" / slug) for slug in STAGE1_SLUGS})


def score(config: dict, out: Path, runs: list[Run], picks: dict[str, dict[str, int]]) -> int:
    """Write `OUT/table-spec.yaml` for the rows there are and evaluate it into `OUT/table/`."""
    stages = table_stages(config, out, picks)
    spec = out / "table-spec.yaml"
    write_spec(config, stages, spec)
    table = entry_point("scripts/results_table.py")
    code = table.main([str(spec), "--out", str(out / "table"), "--threads", str(config["threads"])])
    markdown = out / "table" / "table.md"
    left = unfinished(out)
    note = f"\n**The table so far**: not trained yet, so not in it: {', '.join(left)}.\n" if left else ""
    markdown.write_text(markdown.read_text(encoding="utf-8") + note + provenance(stages, runs, out), encoding="utf-8")
    print(f"\nTable: {markdown}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
