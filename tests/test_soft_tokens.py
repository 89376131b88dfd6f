import pytest
import torch

from softalign import SoftTokens, SoftTokensConfig
from softalign.soft_tokens import timestep_buckets


@pytest.mark.parametrize(
    "family, objective, shapes, n_params, blocks, position, init",
    [
        (
            "sd15",
            "agsm",
            {"tokens": (2, 4, 768), "timestep_embedding.weight": (100, 768)},
            82_944,
            ["down", "mid"],
            "after_bos",
            "null_prompt",
        ),
        (
            "sdxl",
            "agsm",
            {"tokens": (2, 4, 2048), "timestep_embedding.weight": (100, 2048)},
            221_184,
            ["down", "mid"],
            "after_bos",
            "normal",
        ),
        (
            "sd3",
            "agsm",
            {"tokens": (2, 5, 4, 1536), "timestep_embedding.weight": (100, 7680)},
            829_440,
            None,
            "append",
            "normal",
        ),
        (
            "sd15",
            "softrepa",
            {"tokens": (1, 4, 768), "timestep_embedding.weight": (100, 768)},
            79_872,
            ["down"],
            "after_bos",
            "null_prompt",
        ),
        (
            "sd3",
            "softrepa",
            {"tokens": (1, 5, 4, 1536), "timestep_embedding.weight": (100, 7680)},
            798_720,
            None,
            "prepend",
            "normal",
        ),
    ],
)
def test_family_defaults_match_the_official_configurations(family, objective, shapes, n_params, blocks, position, init):
    config = SoftTokensConfig.for_family(family, objective=objective)
    assert config.parameter_shapes() == shapes
    assert config.unet_blocks == blocks and config.position == position and config.init == init
    tokens = SoftTokens(config)
    # METHOD.md sizes: SD3 about 0.83M, SD1.5 about 83k, SDXL about 220k (AGSM, two banks).
    assert sum(p.numel() for p in tokens.parameters()) == n_params
    assert set(tokens.state_dict()) == set(shapes)


def test_initialisation_is_normal_with_the_configured_std():
    tokens = SoftTokens(SoftTokensConfig(architecture="unet", dim=512, n_tokens=64, init_std=0.02))
    assert abs(tokens.tokens.std().item() - 0.02) < 0.002
    assert abs(tokens.tokens.mean().item()) < 0.002


@pytest.mark.parametrize(
    "t, bucket",
    [(0, 0), (9, 0), (10, 1), (537, 53), (999, 99), (1000, 99), (999.7, 99), (5.5, 0), (19.99, 1)],
)
def test_timestep_bucket_is_t_floor_div_10_and_1000_maps_to_999(t, bucket):
    assert timestep_buckets(torch.tensor([t])).tolist() == [bucket]


def test_unet_tokens_pick_the_bank_per_row_and_add_the_timestep_row():
    config = SoftTokensConfig(architecture="unet", dim=3, n_tokens=2, n_banks=2)
    tokens = SoftTokens(config)
    with torch.no_grad():
        tokens.tokens.copy_(torch.arange(12.0).reshape(2, 2, 3))
        tokens.timestep_embedding.weight.copy_(torch.arange(300.0).reshape(100, 3) * 100)
    out = tokens(torch.tensor([1, 0]), torch.tensor([537, 20]))
    # row 0: bank 1 + bucket 53; row 1: bank 0 + bucket 2 (hand-computed)
    expected = torch.tensor(
        [
            [[6 + 15900, 7 + 16000, 8 + 16100], [9 + 15900, 10 + 16000, 11 + 16100]],
            [[0 + 600, 1 + 700, 2 + 800], [3 + 600, 4 + 700, 5 + 800]],
        ]
    )
    assert torch.equal(out, expected)


def test_mmdit_timestep_part_is_chunked_per_layer():
    config = SoftTokensConfig(architecture="mmdit", dim=2, n_tokens=1, n_banks=1, n_layers=3)
    tokens = SoftTokens(config)
    with torch.no_grad():
        tokens.tokens.zero_()
        tokens.timestep_embedding.weight.copy_(torch.arange(600.0).reshape(100, 6))
    out = tokens(torch.tensor([0]), torch.tensor([15]))  # bucket 1 -> row [6, 7, 8, 9, 10, 11]
    assert out.shape == (1, 3, 1, 2)
    assert out[0, :, 0].tolist() == [[6, 7], [8, 9], [10, 11]]


def test_without_timestep_embedding_tokens_ignore_t():
    tokens = SoftTokens(SoftTokensConfig(architecture="unet", dim=4, timestep_embedding=False))
    assert tokens.timestep_embedding is None
    assert torch.equal(tokens(torch.tensor([1]), None), tokens.tokens[1:2])


def test_null_prompt_initialisation_copies_the_bos_state_into_every_token():
    tokens = SoftTokens(SoftTokensConfig(architecture="unet", dim=4, n_tokens=3))
    null = torch.randn(1, 77, 4)
    tokens.init_from_null_prompt(null)
    assert torch.equal(tokens.tokens, null[0, 0].expand(2, 3, 4))
    with pytest.raises(ValueError, match="width 5"):
        tokens.init_from_null_prompt(torch.randn(1, 77, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "dit", "dim": 8}, "architecture must be one of"),
        ({"architecture": "unet", "dim": 0}, "dim must be a positive integer"),
        ({"architecture": "unet", "dim": 8, "n_banks": 0}, "n_banks must be a positive integer"),
        ({"architecture": "unet", "dim": 8, "position": "append"}, "must be 'after_bos'"),
        ({"architecture": "unet", "dim": 8, "unet_blocks": ["side"]}, "unet_blocks must be"),
        ({"architecture": "unet", "dim": 8, "unet_blocks": []}, "unet_blocks must be"),
        ({"architecture": "unet", "dim": 8, "n_layers": 3}, "n_layers is for architecture 'mmdit'"),
        ({"architecture": "mmdit", "dim": 8, "position": "after_bos"}, "'append' or 'prepend'"),
        ({"architecture": "mmdit", "dim": 8, "init": "null_prompt"}, "'null_prompt' is for architecture 'unet'"),
        ({"architecture": "mmdit", "dim": 8, "n_layers": 0}, "n_layers must be a positive integer"),
        ({"architecture": "unet", "dim": 8, "init_std": -1.0}, "init_std must be a positive number"),
    ],
)
def test_invalid_configs_name_the_field_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftTokensConfig(**kwargs)


def test_config_roundtrip_drops_unknown_keys_with_a_warning():
    config = SoftTokensConfig.for_family("sd3")
    data = {**config.to_dict(), "from_the_future": 1}
    with pytest.warns(UserWarning, match="from_the_future"):
        again = SoftTokensConfig.from_dict(data)
    assert again == config
    with pytest.raises(ValueError, match="missing the required keys"):
        SoftTokensConfig.from_dict({"n_tokens": 4})


def test_bank_ids_out_of_range_are_refused():
    tokens = SoftTokens(SoftTokensConfig(architecture="unet", dim=4, n_banks=2))
    with pytest.raises(ValueError, match=r"bank ids must lie in \[0, 1\]"):
        tokens(torch.tensor([2]), torch.tensor([3]))
