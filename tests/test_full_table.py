"""recipes/full_table.py: every row of the README's table trained, the table built, resumed, and mixed runs refused."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    "base",
    "fine-tune (diffusion loss, LoRA), end (step 2)",
    "SoftREPA tokens, best",
    "SoftREPA tokens, end (step 2)",
    "AGSM tokens, best",
    "AGSM tokens, end (step 2)",
    "AGSM tokens + LoRA, end (step 2)",
    "DDPO alone (tokens + LoRA)",
    "AGSM (end) then DDPO",
    "AGSM (end) alongside DDPO",
    "AGSM (end) then Diffusion-DPO",
    "DDPO alone on counting prompts",
    "AGSM (end) then DDPO on counting prompts",
]


def _expected(out: Path) -> list[str]:
    """ROWS, with a curve whose best point is its last as one row."""
    expected = list(ROWS)
    for slug, title in (("softrepa-tokens", "SoftREPA tokens"), ("agsm-tokens", "AGSM tokens")):
        points = json.loads((out / "rows" / slug / "curve.json").read_text())["points"][1:]
        if max(points, key=lambda p: (p["counting"], -p["step"]))["step"] == points[-1]["step"]:
            at = expected.index(f"{title}, best")
            expected[at : at + 2] = [f"{title}, best = end (step {points[-1]['step']})"]
    return expected


def _load(relative: str):
    spec = importlib.util.spec_from_file_location(f"under_test_{Path(relative).stem}", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the driver's dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _tiny_config(model: Path, **rl) -> dict:
    """A few steps of everything, one image per prompt, one CFG, two tags."""
    return {
        "model": str(model),
        "threads": 1,
        "sample_steps": 2,
        "stage1": {
            **{"max_steps": 2, "eval_every": 1, "train_batch_size": 4, "images": 16, "resolution": 32},
            **{"curve_tags": ["counting"], "curve_images_per_tag": 1, "n_tokens": 2, "unet_blocks": "down,up"},
        },
        "rl": {"ddpo_epochs": 1, "batch_size": 2, "train_batch_size": 1, "dpo_epochs": 1, **rl},
        "table": {"tags": ["counting", "single_object"], "images_per_tag": 1, "guidance_scales": [1.5]},
    }


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The driver run once, end to end, on a tiny model: (module, config path, output directory)."""
    from softalign.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("full")
    tiny_pipeline("sd15").save_pretrained(root / "model")
    config = _write(root / "tiny.yaml", _tiny_config(root / "model"))
    full_table = _load("recipes/full_table.py")
    assert full_table.main(["--config", config, "--out", str(root / "out")]) == 0
    return full_table, config, root / "out"


def test_every_row_is_trained_and_in_the_table(table):
    _, _, out = table
    rows = json.loads((out / "table" / "table.json").read_text())["rows"]
    names = [row["stage"] for row in rows]
    expected = _expected(out)
    assert len(names) == len(expected) and all(n.startswith(r) for n, r in zip(names, expected, strict=True))
    assert all(row["guidance_scale"] == 1.5 for row in rows)
    markdown = (out / "table" / "table.md").read_text()
    assert all(name in markdown for name in names) and "How each row was made" in markdown
    # the best checkpoints follow the rule: highest held-out counting after step 0, ties to the earlier step
    for slug in ("softrepa-tokens", "agsm-tokens"):
        points = json.loads((out / "rows" / slug / "curve.json").read_text())["points"][1:]
        best = max(points, key=lambda p: (p["counting"], -p["step"]))["step"]
        assert any(
            name.endswith(f"(step {best})") and ", best" in name and name.startswith(("SoftREPA", "AGSM"))
            for name in names
        )
    # AGSM + LoRA (stage1_curve --with-lora) keeps the tokens and both LoRA banks
    saved = out / "rows" / "agsm-lora" / "adapters" / "step-000002"
    assert (saved / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in (saved / "lora").iterdir()} == {"softalign_pos", "softalign_neg"}
    spec = yaml.safe_load((out / "table-spec.yaml").read_text())
    lora_row = next(s for s in spec["stages"] if s["name"].startswith("AGSM tokens + LoRA"))
    assert lora_row["lora"].endswith("softalign_pos") and "soft_tokens" in lora_row
    done = json.loads((out / "rows" / "agsm-then-ddpo" / "done.json").read_text())["request"]
    assert done["entry"] == "recipes/ddpo.py" and "$OUT/rows/agsm-tokens/adapters/step-000002/adapter" in done["argv"]
    counting = json.loads((out / "rows" / "agsm-then-ddpo-counting" / "done.json").read_text())["request"]["argv"]
    assert counting[counting.index("--tags") + 1] == "counting" and "--tags" not in done["argv"]
    assert [arg for arg in counting if arg not in ("--tags", "counting")][:-1] == done["argv"][:-1]  # all but --out
    # every row with tokens has the config's layout: the curves' new tokens, DDPO alone's, and the RL rows' start
    for adapter in (
        out / "rows" / "softrepa-tokens" / "adapters" / "step-000002" / "adapter",
        saved / "adapter",
        out / "rows" / "ddpo" / "adapter",
        out / "rows" / "agsm-then-ddpo" / "adapter",
        out / "rows" / "agsm-alongside-ddpo" / "adapter-stage2",
    ):
        layout = json.loads((adapter / "adapter_config.json").read_text())
        assert (layout["n_tokens"], layout["unet_blocks"]) == (2, ["down", "up"]), adapter
    assert "--threads" not in done["argv"]  # a row may be continued with another thread count
    title = (out / "rows" / "agsm-alongside-ddpo" / "report.md").read_text().splitlines()[0]
    assert title == "# softalign flagship: agsm then ddpo, with agsm alongside (weight 0.5)"
    from PIL import Image

    assert Image.open(out / "curves.png").size == (2 * 360, 220 + 4 * 14)  # counting, over-count; a line a curve


def test_a_second_run_through_the_flagship_retrains_and_redraws_nothing(table, monkeypatch):
    _, config, out = table
    from softalign import SoftAlignTrainer
    from softalign.rl import DDPOTrainer, DiffusionDPOTrainer

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    for trainer in (SoftAlignTrainer, DDPOTrainer, DiffusionDPOTrainer):
        monkeypatch.setattr(trainer, "train", refuse)
    table_files = {out / "table" / "table.md", out / "table" / "table.json", out / "curves.png"}  # redrawn alike
    table_files |= set((out / "table").glob("grid-*.png"))
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p not in table_files}
    flagship = _load("recipes/softalign_then_ddpo.py")
    assert flagship.main(["--full", "--out", str(out), "--full-config", config]) == 0
    assert [p for p, t in written.items() if p.stat().st_mtime_ns != t] == []  # markers, adapters, every image


def test_a_changed_budget_for_a_finished_row_is_refused_by_name(table, tmp_path):
    full_table, config, out = table
    budgets = yaml.safe_load(Path(config).read_text())
    budgets["rl"]["ddpo_epochs"] = 2
    changed = _write(tmp_path / "changed.yaml", budgets)
    with pytest.raises(full_table.RunMismatch, match=r"row 'DDPO alone'.*--epochs 1 -> 2"):
        full_table.main(["--config", changed, "--out", str(out)])


def test_the_config_is_checked_key_by_key(tmp_path):
    full_table = _load("recipes/full_table.py")
    # the shipped file spells out the defaults (the papers' scale) and nothing else
    assert full_table.read_config(full_table.DEFAULT_CONFIG) == full_table.DEFAULTS
    cases = [
        ({"stage1": {"max_step": 10}}, r"unknown key\(s\) \['stage1.max_step'\]; expected .*'stage1.max_steps'"),
        ({"ddpo_epochs": 3}, r"unknown key\(s\) \['ddpo_epochs'\]; expected .*'rl'"),
        ({"stage1": {"learning_rate": "1e-3"}}, r"stage1.learning_rate must be a number \(YAML reads 1e-3 as text"),
        ({"rl": {"ddpo_epochs": 0}}, "rl.ddpo_epochs must be positive"),
        ({"rl": {"start_from": "middle"}}, "rl.start_from must be best or end"),
        ({"stage1": {"eval_every": 300}}, "eval_every must divide"),
        ({"table": {"tags": ["counting", "shapes"]}}, r"table.tags: unknown \['shapes'\]"),
        ({"stage1": {"curve_tags": ["colors"]}}, "must include counting"),
        ({"rl": 3}, "rl must be a mapping"),
        ({"stage1": {"unet_blocks": "down,middle"}}, r"unet_blocks must be distinct names of \['down', 'mid', 'up'\]"),
        ({"stage1": {"unet_blocks": "down,down"}}, "unet_blocks must be distinct"),
        ({"stage1": {"n_tokens": -1}}, "n_tokens must be >= 0"),
    ]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            full_table.read_config(_write(tmp_path / "bad.yaml", given))
    sd3 = full_table.read_config(ROOT / "recipes" / "configs" / "full_table" / "sd3.yaml")
    assert (sd3["model"], sd3["guidance_scale"], sd3["stage1"]["n_tokens"]) == ("models/shapes-sd3", 3.0, 16)
    argv = full_table.stage1_runs(sd3, tmp_path)[1].argv
    assert "--unet-blocks" not in argv and argv[argv.index("--n-tokens") + 1] == "16"
    full_table.check_model(sd3, "sd3.yaml")  # the shipped model: a pipeline directory without a UNet
    with pytest.raises(ValueError, match="has no UNet"):
        full_table.check_model({**sd3, "stage1": {**sd3["stage1"], "unet_blocks": "down"}}, "sd3.yaml")
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline directory"):
        full_table.check_model({**sd3, "model": str(tmp_path)}, "sd3.yaml")
    with pytest.raises(SystemExit):  # the command line says it too, before anything runs
        full_table.main(["--config", _write(tmp_path / "bad.yaml", {"tabel": {}}), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_best_is_the_highest_counting_after_step_0_and_a_tie_goes_to_the_earlier_step(tmp_path):
    full_table = _load("recipes/full_table.py")
    points = [{"step": 0, "counting": 0.9}, {"step": 500, "counting": 0.3}]
    points += [{"step": 1000, "counting": 0.4}, {"step": 1500, "counting": 0.4}, {"step": 2000, "counting": 0.2}]
    (tmp_path / "curve.json").write_text(json.dumps({"points": points}))
    assert full_table.checkpoints(tmp_path) == {"best": 1000, "end": 2000}


def test_rows_train_alone_and_the_rl_rows_wait_for_the_agsm_curve(tmp_path):
    full_table = _load("recipes/full_table.py")
    config = full_table.read_config(full_table.DEFAULT_CONFIG)
    assert [run.slug for run in full_table.stage1_runs(config, tmp_path)] == full_table.STAGE1_SLUGS
    assert [run.slug for run in full_table.rl_runs(config, tmp_path, tmp_path)] == full_table.RL_SLUGS
    config_path = _write(tmp_path / "c.yaml", {})
    with pytest.raises(SystemExit):  # an unknown run is named before anything trains
        full_table.main(["--config", config_path, "--out", str(tmp_path / "out"), "--rows", "agsm"])
    with pytest.raises(SystemExit):  # the RL rows start from the finished AGSM curve
        full_table.main(["--config", config_path, "--out", str(tmp_path / "out"), "--rows", "ddpo"])
    assert not (tmp_path / "out" / "rows").exists()


def test_a_finished_row_is_skipped_by_a_run_with_another_thread_count(table, capsys):
    full_table, config, out = table
    assert full_table.main(["--config", config, "--out", str(out), "--rows", "fine-tune,ddpo", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tune: done, skipped" in printed and "DDPO alone: done, skipped" in printed
    assert "not finished yet: none" in printed


def test_the_table_so_far_scores_only_the_finished_runs_and_trains_nothing(table, tmp_path, monkeypatch):
    import shutil

    full_table, config, out = table
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for slug in ("agsm-lora", "ddpo"):  # as if still training
        (copy / "rows" / slug / "done.json").unlink()
    monkeypatch.setattr(full_table, "train", lambda *a: pytest.fail("--table-so-far trained a run"))
    assert full_table.main(["--config", config, "--out", str(copy), "--table-so-far"]) == 0
    names = [row["stage"] for row in json.loads((copy / "table" / "table.json").read_text())["rows"]]
    expected = [row for row in _expected(out) if not row.startswith(("AGSM tokens + LoRA", "DDPO alone (tokens"))]
    assert len(names) == len(expected) and all(n.startswith(r) for n, r in zip(names, expected, strict=True))
    assert "not trained yet, so not in it: agsm-lora, ddpo" in (copy / "table" / "table.md").read_text()
    with pytest.raises(SystemExit):
        full_table.main(["--config", config, "--out", str(copy), "--table-so-far", "--rows", "ddpo"])


def test_a_curve_whose_best_point_is_its_last_is_one_row(tmp_path):
    full_table = _load("recipes/full_table.py")
    config = full_table.read_config(full_table.DEFAULT_CONFIG)
    picks = {"softrepa-tokens": {"best": 5000, "end": 5000}, "agsm-tokens": {"best": 4000, "end": 5000}}
    stages = full_table.table_stages(config, tmp_path, picks)
    assert [stage["name"] for stage in stages] == [
        "base",
        "SoftREPA tokens, best = end (step 5000)",
        "AGSM tokens, best (step 4000)",
        "AGSM tokens, end (step 5000)",
    ]
