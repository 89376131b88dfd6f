"""The recipes run end to end on a tiny budget, so they cannot rot."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@pytest.mark.slow  # every stage with three evaluations; the stages also run alone below
def test_flagship_recipe_runs_all_stages_and_writes_the_report(tmp_path):
    import softalign_then_ddpo as recipe

    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    code = recipe.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "run"),
            "--stage1-steps",
            "2",
            "--stage1-images",
            "16",
            "--stage2-epochs",
            "1",
            "--eval-images-per-prompt",
            "1",
            "--sample-steps",
            "2",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    run = tmp_path / "run"
    for name in ("report.md", "report.json", "curves.png", "grid-base.png", "grid-stage1.png", "grid-stage2.png"):
        assert (run / name).is_file(), name
    assert (run / "adapter-stage2" / "adapter_model.safetensors").is_file()
    report = json.loads((run / "report.json").read_text())
    assert set(report["summaries"]) == {"base", "stage1", "stage2"}
    text = (run / "report.md").read_text()
    assert "counting" in text and "p (McNemar)" in text and "Stage 2 against stage 1" in text
    # the paired counts are the same images as the summaries: the change in correct images is only_b - only_a
    base = report["summaries"]["base"]["images"]
    for stage in ("stage1", "stage2"):
        test, images = report["paired"][stage]["all"], report["summaries"][stage]["images"]
        assert test["n"] == base["n"] == images["n"]
        assert test["only_b"] - test["only_a"] == images["k"] - base["k"]


def test_recipe_presets_parse_into_valid_configs():
    import softalign_then_ddpo as recipe
    import yaml

    from softalign.rl import DDPOConfig, DiffusionDPOConfig
    from softalign.softalign_config import SoftAlignConfig

    for preset in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        args = recipe.parse_args(["--config", str(preset)])
        SoftAlignConfig.from_dict(args.softalign_overrides)
        DDPOConfig(**args.stage2_overrides)
        assert yaml.safe_load(preset.read_text())["objective"] == args.objective
        # the file's sections win over the recipe's small-budget defaults
        stage1 = recipe.configured(SoftAlignConfig, args.softalign_overrides, "softalign", learning_rate=5.0)
        assert stage1.learning_rate == args.softalign_overrides["learning_rate"] != 5.0
        stage2 = recipe.configured(DDPOConfig, args.stage2_overrides, "stage2_config", sample_num_steps=3)
        assert stage2.sample_num_steps == args.stage2_overrides["sample_num_steps"] != 3
    with pytest.raises(SystemExit, match="'stage2_config' section does not fit DiffusionDPOConfig"):
        recipe.configured(DiffusionDPOConfig, {"sample_num_steps": 50}, "stage2_config")


def _tiny_model(tmp_path):
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_soft_tokens_recipe(tmp_path):
    assert (
        _load("train_soft_tokens").main(
            [
                "--model",
                _tiny_model(tmp_path),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--images",
                "16",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_ddpo_and_dpo_recipes(tmp_path):
    from PIL import Image

    load = _load

    model = _tiny_model(tmp_path)
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na photo of a dog\n")
    assert (
        load("ddpo").main(
            [
                "--model",
                model,
                "--out",
                str(tmp_path / "ddpo"),
                "--reward",
                "jpeg",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--epochs",
                "1",
                "--sample-steps",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    counting = tmp_path / "ddpo-counting"
    flags = ["--model", model, "--out", str(counting), "--tags", "counting", "--train-lora", "--epochs", "1"]
    flags += ["--sample-steps", "2", "--batch-size", "2", "--train-batch-size", "1", "--guidance-scale", "1.5"]
    flags += ["--eval-every", "1", "--eval-images-per-prompt", "1", "--eval-steps", "2"]
    flags += ["--timestep-fraction", "1.0", "--eta", "0.8", "--clip-range", "1e-3"]
    assert load("ddpo").main(flags) == 0
    state = json.loads(next(counting.glob("checkpoint-*/trainer_state.json")).read_text())["config"]
    assert (state["train_timestep_fraction"], state["sample_eta"], state["train_clip_range"]) == (1.0, 0.8, 1e-3)
    curve = [json.loads(line) for line in (counting / "heldout-curve.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in curve] == [0, 1] and all(0 <= row["counting"] <= 1 for row in curve)
    assert (counting / "heldout-curve.png").is_file() and (counting / "evals" / "epoch-001" / "summary.json").is_file()
    assert (counting / "adapter" / "adapter_model.safetensors").is_file()
    assert (counting / "lora" / "softalign" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(SystemExit):
        load("ddpo").main(["--model", model, "--tags", "counting,shapes"])
    with pytest.raises(SystemExit):  # a saved adapter brings its own layout
        load("ddpo").main(["--model", model, "--soft-tokens", str(counting / "adapter"), "--n-tokens", "8"])
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    Image.new("RGB", (32, 32), "red").save(pairs / "a.png")
    Image.new("RGB", (32, 32), "white").save(pairs / "b.png")
    (pairs / "pairs.jsonl").write_text('{"caption": "a red square", "chosen": "a.png", "rejected": "b.png"}\n' * 4)
    assert (
        load("diffusion_dpo").main(
            ["--model", model, "--pairs", str(pairs), "--out", str(tmp_path / "dpo"), "--max-steps", "2"]
        )
        == 0
    )
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_flagship_count_groups_keep_each_images_negatives_in_its_group():

    from softalign.shapes.prompts import split_prompts

    by_prompt = {line["prompt"]: line for line in split_prompts("train")}
    from softalign.shapes.pairs import shapes_pairs

    pairs = shapes_pairs(16, seed=0, count_groups=1.0)
    assert len(pairs) == 16
    for start in range(0, 16, 4):
        clauses = [by_prompt[caption]["include"][0] for _, caption in pairs[start : start + 4]]
        assert len({c["class"] for c in clauses}) == 1 and len({c["count"] for c in clauses}) == 4


def test_diffusion_dpo_recipe_keeps_the_lora_and_inits_tokens_as_their_config_says(tmp_path):
    """Defects: recipes/diffusion_dpo.py saved only the tokens (`--train-lora` lost the LoRA), and it and
    recipes/ddpo.py wrote `init="null_prompt"` for tokens initialised from a normal distribution."""
    from PIL import Image

    from softalign import SoftTokens

    model = _tiny_model(tmp_path)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    Image.new("RGB", (32, 32), "red").save(pairs / "a.png")
    Image.new("RGB", (32, 32), "white").save(pairs / "b.png")
    (pairs / "pairs.jsonl").write_text('{"caption": "a red square", "chosen": "a.png", "rejected": "b.png"}\n' * 4)
    flags = ["--model", model, "--pairs", str(pairs), "--out", str(tmp_path / "dpo"), "--max-steps", "1"]
    assert _load("diffusion_dpo").main([*flags, "--train-lora"]) == 0
    assert (tmp_path / "dpo" / "lora" / "softalign" / "pytorch_lora_weights.safetensors").is_file()
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
    flags = ["--model", model, "--out", str(tmp_path / "ddpo"), "--reward", "jpeg", "--prompts"]
    flags += [str(tmp_path / "prompts.txt"), "--epochs", "1", "--sample-steps", "2", "--batch-size", "2"]
    flags += ["--learning-rate", "1e-4"]
    assert _load("ddpo").main(flags) == 0
    for run in ("dpo", "ddpo"):
        tokens = SoftTokens.from_pretrained(tmp_path / run / "adapter")
        assert tokens.config.init == "null_prompt", run  # the SD1.x preset
        values = tokens.tokens.detach()  # one BOS state for every token of a bank, moved a little by training
        spread = (values - values[:, :1]).abs().max().item()
        assert spread < 5e-3, (run, spread)  # normal(0, 0.02) tokens differ by ~0.05 or more


def test_flagship_can_start_stage_2_from_a_saved_stage_1_adapter(tmp_path):
    import softalign_then_ddpo as recipe
    from safetensors.torch import load_file

    from softalign import SoftTokens, save_soft_tokens
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(tmp_path / "model")
    tokens = SoftTokens.for_pipeline(pipe, objective="agsm")
    save_soft_tokens(tokens, tmp_path / "adapter")
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "run"),
        "--stage1-from",
        str(tmp_path / "adapter"),
    ]
    argv += ["--stage2", "none", "--stage1-images", "16", "--eval-images-per-tag", "1", "--sample-steps", "2"]
    assert recipe.main([*argv, "--threads", "1"]) == 0
    run = tmp_path / "run"
    saved, loaded = (load_file(d / "adapter_model.safetensors") for d in (run / "adapter-stage1", tmp_path / "adapter"))
    assert saved.keys() == loaded.keys() and all((saved[k] == loaded[k]).all() for k in saved)  # nothing trained
    assert not (run / "stage1").exists() or not any((run / "stage1").glob("checkpoint-*"))
    assert "Stage 1 was not trained here" in (run / "report.md").read_text()
    key = json.loads((run / "eval-stage1" / "run.json").read_text())["key"]
    assert key["soft_tokens"] is not None


def test_flagship_starts_from_the_models_shipped_adapter_unless_asked_to_train(tmp_path):
    import softalign_then_ddpo as recipe

    from softalign import SoftTokens, save_soft_tokens
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(tmp_path / "model")
    shipped = tmp_path / "model" / "adapters" / "agsm"
    save_soft_tokens(SoftTokens.for_pipeline(pipe, objective="agsm"), shipped)
    model = ["--model", str(tmp_path / "model")]
    args = recipe.parse_args(model)
    assert (args.stage1_from, args.stage1_shipped, args.stage2_tags) == (str(shipped), True, "counting")
    assert recipe.parse_args([*model, "--stage2-tags", "colors"]).stage2_tags == "colors"
    trains = recipe.parse_args([*model, "--stage1-steps", "300"])
    assert (trains.stage1_from, trains.stage2_tags) == (None, None)  # asked to train: it trains, on every tag
    assert recipe.parse_args([*model, "--objective", "softrepa"]).stage1_from is None  # none shipped for SoftREPA
    assert recipe.parse_args([*model, "--stage1-from", "x"]).stage1_from == "x"
    assert recipe.parse_args(["--model", str(tmp_path)]).stage1_steps == recipe.STAGE1_STEPS  # nothing shipped
    argv = [*model, "--out", str(tmp_path / "run"), "--stage2", "none", "--eval-images-per-tag", "1"]
    assert recipe.main([*argv, "--sample-steps", "2", "--threads", "1"]) == 0
    assert "the adapter the model ships" in (report := (tmp_path / "run" / "report.md").read_text())
    assert "on the training split's counting prompts" in report


def test_flagship_refuses_a_missing_stage_1_adapter(tmp_path):
    import softalign_then_ddpo as recipe

    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "run"), "--stage1-from", str(tmp_path / "none")]
    with pytest.raises(FileNotFoundError, match="none"):
        recipe.main([*argv, "--stage2", "none", "--threads", "1"])
