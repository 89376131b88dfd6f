import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import softalign.loaders as loaders
from softalign import (
    SoftTokens,
    SoftTokensConfig,
    attach_soft_tokens,
    load_soft_tokens,
    save_soft_tokens,
    unload_soft_tokens,
)
from softalign.families import context_dim_of
from softalign.testing import tiny_pipeline

CALL = dict(prompt="a photo of a red cat", num_inference_steps=2, height=32, width=32, output_type="np")


def generate(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def trained_like_tokens(pipe, family):
    tokens = SoftTokens(SoftTokensConfig.for_family(family, dim=context_dim_of(pipe), init="normal"))
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0, 1.0)
    return tokens


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_save_load_into_a_fresh_pipeline_gives_identical_images_and_unload_restores_the_base(family, tmp_path):
    pipe = tiny_pipeline(family)
    tokens = trained_like_tokens(pipe, family)
    attach_soft_tokens(pipe, tokens)
    expected = generate(pipe)
    save_soft_tokens(pipe, tmp_path / "adapter")

    fresh = tiny_pipeline(family)  # same seed: same base weights
    base = generate(fresh)
    injection = load_soft_tokens(fresh, tmp_path / "adapter")
    assert (generate(fresh) == expected).all()
    assert not (expected == base).all()
    assert unload_soft_tokens(fresh) is injection.soft_tokens
    assert (generate(fresh) == base).all()
    assert unload_soft_tokens(fresh) is None


def test_adapter_files_hold_float32_state_dict_keys_and_the_config_in_the_header(tmp_path):
    tokens = SoftTokens(SoftTokensConfig.for_family("sd3", dim=32))
    save_soft_tokens(tokens, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(tensors) == set(tokens.state_dict())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as handle:
        header = json.loads(handle.metadata()["adapter_config"])
    on_disk = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert header == on_disk and on_disk["format"] == "softalign.soft_tokens"
    assert SoftTokensConfig.from_dict(on_disk) == tokens.config
    again = SoftTokens.from_pretrained(tmp_path / "a")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tokens.state_dict().items())


def test_loading_into_the_wrong_family_or_width_names_both_shapes(tmp_path):
    save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=32)), tmp_path / "unet")
    with pytest.raises(ValueError, match=r"unet denoiser.*\(2, 4, 32\).*SD3Transformer2DModel"):
        load_soft_tokens(tiny_pipeline("sd3"), tmp_path / "unet")
    with pytest.raises(ValueError, match=r"\(2, 4, 32\).*width is 64.*\(2, 4, 64\)"):
        load_soft_tokens(tiny_pipeline("sd15", cross_attention_dim=64), tmp_path / "unet")


def test_missing_and_corrupt_adapters_get_errors_that_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        SoftTokens.from_pretrained(tmp_path / "nowhere")
    save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=32)), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        SoftTokens.from_pretrained(tmp_path / "a")

    save_file({"tokens": torch.zeros(2, 4, 16)}, weights)  # wrong shape, missing key
    with pytest.raises(ValueError, match="holds tensors"):
        SoftTokens.from_pretrained(tmp_path / "a")
    tensors = {"tokens": torch.zeros(2, 4, 16), "timestep_embedding.weight": torch.zeros(100, 32)}
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"'tokens' has shape \(2, 4, 16\), its config expects \(2, 4, 32\)"):
        SoftTokens.from_pretrained(tmp_path / "a")
    tensors = {"tokens": torch.full((2, 4, 32), float("nan")), "timestep_embedding.weight": torch.zeros(100, 32)}
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SoftTokens.from_pretrained(tmp_path / "a")

    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        SoftTokens.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not a softalign soft-token config"):
        SoftTokens.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_config.json"):
        SoftTokens.from_pretrained(tmp_path / "a")


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    first = SoftTokens(SoftTokensConfig.for_family("sd15", dim=32))
    save_soft_tokens(first, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=32)), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging directory left behind


def test_loading_twice_is_refused_until_unloaded(tmp_path):
    pipe = tiny_pipeline("sd15")
    save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=32)), tmp_path / "a")
    load_soft_tokens(pipe, tmp_path / "a")
    with pytest.raises(ValueError, match="already carries soft tokens"):
        load_soft_tokens(pipe, tmp_path / "a")
    unload_soft_tokens(pipe)
    load_soft_tokens(pipe, tmp_path / "a")


def test_save_refuses_objects_without_tokens():
    with pytest.raises(ValueError, match="Expected SoftTokens"):
        loaders._soft_tokens_from(tiny_pipeline("sd15"))


def test_adapters_record_their_base_model_and_warn_when_loaded_into_another(tmp_path):
    import json
    import warnings

    pipe = tiny_pipeline("sd15")
    tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=context_dim_of(pipe), init="normal"))
    attach = attach_soft_tokens(pipe, tokens)
    save_soft_tokens(pipe, tmp_path / "a")
    attach.detach()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_class"] == "StableDiffusionPipeline" and config["base_model_config_hash"]
    assert "base_model_name_or_path" in config
    assert (
        SoftTokens.from_pretrained(tmp_path / "a").base_model["base_model_config_hash"]
        == config["base_model_config_hash"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no warning, and the extra keys are no "unknown keys"
        unload_soft_tokens(pipe)
        load_soft_tokens(pipe, tmp_path / "a")
    other = tiny_pipeline("sd15", cross_attention_dim=context_dim_of(pipe), layers_per_block=2)
    with pytest.warns(UserWarning, match="were trained on"):
        load_soft_tokens(other, tmp_path / "a")


def test_read_soft_tokens_is_a_deprecated_alias(tmp_path):
    from softalign import read_soft_tokens

    save_soft_tokens(SoftTokens(SoftTokensConfig.for_family("sd15", dim=32, init="normal")), tmp_path / "a")
    with pytest.warns(DeprecationWarning, match="SoftTokens.from_pretrained"):
        assert isinstance(read_soft_tokens(tmp_path / "a"), SoftTokens)
