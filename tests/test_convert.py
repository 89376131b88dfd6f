"""Conversion of the SoftREPA / AGSM releases, checked on synthetic files laid out like the real ones."""

import os

import pytest
import torch
from helpers import ContextRecorder, denoiser_inputs, run_denoiser, unet_cross_blocks

from softalign import attach_soft_tokens, convert_official_tokens, load_foreign_tensor, load_soft_tokens
from softalign.cli import main as cli_main
from softalign.testing import tiny_pipeline

# (tokens shape, timestep-embedding width or None) per format and family, as released.
LAYOUTS = {
    ("softrepa", "sd15"): ((4, 768), 768),
    ("softrepa", "sdxl"): ((4, 2048), None),
    ("softrepa", "sd3"): ((5, 4, 1536), 7680),
    ("agsm", "sd15"): ((2, 4, 768), 768),
    ("agsm", "sdxl"): ((2, 4, 2048), 2048),
    ("agsm", "sd3"): ((2, 5, 4, 1536), 7680),
}
FILES = {"softrepa": ("dc_tokens.pth", "dc_t_tokens.pth"), "agsm": ("soft_tokens.pth", "soft_t_tokens.pth")}


def write_release(folder, fmt, token_shape, timestep_width, seed=0):
    """Write files the way the official code does: `torch.save(nn.Parameter)` and `torch.save(nn.Embedding)`."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = torch.nn.Parameter(torch.randn(token_shape))
    torch.save(tokens, folder / FILES[fmt][0])
    embedding = None
    if timestep_width is not None:
        embedding = torch.nn.Embedding(100, timestep_width)
        torch.save(embedding, folder / FILES[fmt][1])
    return tokens.detach(), None if embedding is None else embedding.weight.detach()


@pytest.mark.parametrize("fmt, family", sorted(LAYOUTS))
def test_conversion_infers_the_family_and_keeps_every_value(fmt, family, tmp_path):
    shape, width = LAYOUTS[(fmt, family)]
    tokens, embedding = write_release(tmp_path / "release", fmt, shape, width)
    converted = convert_official_tokens(tmp_path / "release", format=fmt)
    config = converted.config
    assert config.family == family
    assert config.n_banks == (2 if fmt == "agsm" else 1)
    expected_tokens = tokens if fmt == "agsm" else tokens.unsqueeze(0)
    assert torch.equal(converted.tokens.detach(), expected_tokens)
    assert config.timestep_embedding == (width is not None)
    if width is not None:
        assert torch.equal(converted.timestep_embedding.weight.detach(), embedding)
    if family == "sd3":
        assert config.position == ("append" if fmt == "agsm" else "prepend") and config.n_layers == 5
    else:
        assert config.unet_blocks == (["down"] if (fmt, family) == ("softrepa", "sd15") else ["down", "mid"])


@pytest.mark.parametrize("fmt", ["softrepa", "agsm"])
@pytest.mark.parametrize("family, width", [("sd15", 768), ("sdxl", 2048)])
def test_converted_unet_tokens_put_the_official_values_after_bos(fmt, family, width, tmp_path):
    shape, t_width = LAYOUTS[(fmt, family)]
    tokens, embedding = write_release(tmp_path / "release", fmt, shape, t_width)
    assert cli_main(["convert", str(tmp_path / "release"), str(tmp_path / "adapter"), "--format", fmt]) == 0
    pipe = tiny_pipeline(family, cross_attention_dim=width, sample_size=8)
    load_soft_tokens(pipe, tmp_path / "adapter")
    blocks = unet_cross_blocks(pipe.unet)
    recorder = ContextRecorder(blocks["down"])
    inputs = denoiser_inputs(pipe, batch=1, timestep=537)
    with torch.no_grad():
        run_denoiser(pipe, inputs)
    recorder.remove()
    official = tokens[0] if fmt == "agsm" else tokens  # psi+ (bank 0) at inference
    if embedding is not None:
        official = official + embedding[53]
    context = inputs["encoder_hidden_states"]
    assert torch.equal(recorder.seen[0], torch.cat([context[:, :1], official[None], context[:, 1:]], dim=1))


@pytest.mark.parametrize("family", ["sd3", "sd35"])
@pytest.mark.parametrize("fmt", ["softrepa", "agsm"])
def test_converted_sd3_tokens_sit_at_the_official_side_of_each_layer(fmt, family, tmp_path):
    """The SD3 releases also load into SD3.5 (same layout and width as SD3.5 Medium); by shape alone a release is
    read as SD3's, and `family="sd35"` records the variant."""
    shape, t_width = LAYOUTS[(fmt, "sd3")]
    tokens, embedding = write_release(tmp_path / "release", fmt, shape, t_width)
    assert convert_official_tokens(tmp_path / "release", format=fmt).config.family == "sd3"
    soft = convert_official_tokens(tmp_path / "release", format=fmt, family=family)
    assert soft.config.family == family
    pipe = tiny_pipeline(family, caption_projection_dim=1536, attention_head_dim=64, num_layers=5, sample_size=4)
    attach_soft_tokens(pipe, soft)
    recorder = ContextRecorder(list(pipe.transformer.transformer_blocks))
    with torch.no_grad():
        run_denoiser(pipe, denoiser_inputs(pipe, batch=1, text_len=3, timestep=999.0))
    recorder.remove()
    per_layer = tokens[0] if fmt == "agsm" else tokens  # (5, 4, 1536)
    rows = embedding[99].chunk(5)
    for layer, seen in enumerate(recorder.seen):
        official = per_layer[layer] + rows[layer]
        placed = seen[0, -4:] if fmt == "agsm" else seen[0, :4]
        assert seen.shape[1] == 3 + 4
        assert torch.equal(placed, official), layer


def test_family_can_be_given_and_is_checked(tmp_path):
    write_release(tmp_path / "r", "softrepa", (4, 768), 768)
    assert convert_official_tokens(tmp_path / "r" / "dc_tokens.pth", "softrepa", family="sd15").config.family == "sd15"
    with pytest.raises(ValueError, match="width 768, but sdxl has context width 2048"):
        convert_official_tokens(tmp_path / "r", "softrepa", family="sdxl")
    with pytest.raises(ValueError, match="are for a UNet, not SD3"):
        convert_official_tokens(tmp_path / "r", "softrepa", family="sd3")
    write_release(tmp_path / "odd", "softrepa", (4, 320), None)
    with pytest.raises(ValueError, match="cannot infer the model family from width 320"):
        convert_official_tokens(tmp_path / "odd", "softrepa")


def test_bad_release_files_are_reported(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="dc_tokens.pth"):
        convert_official_tokens(tmp_path, "softrepa")
    write_release(tmp_path / "three_banks", "agsm", (3, 4, 768), None)
    with pytest.raises(ValueError, match="leading bank axis of 2"):
        convert_official_tokens(tmp_path / "three_banks", "agsm")
    write_release(tmp_path / "bad_t", "softrepa", (4, 768), 512)
    with pytest.raises(ValueError, match=r"timestep embedding of shape \(100, 512\), expected \(100, 768\)"):
        convert_official_tokens(tmp_path / "bad_t", "softrepa")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "dc_tokens.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        convert_official_tokens(tmp_path / "junk", "softrepa")
    assert cli_main(["convert", str(tmp_path / "junk"), str(tmp_path / "out"), "--format", "softrepa"]) == 2
    assert "softalign convert: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": _RunsCode()}, tmp_path / "dc_tokens.pth")
    with pytest.raises(ValueError, match="Refused to load .*dc_tokens.pth"):
        convert_official_tokens(tmp_path, "softrepa")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a module other than nn.Embedding
    with pytest.raises(ValueError, match="Refused to load"):
        load_foreign_tensor(tmp_path / "module.pth")


def test_cli_output_has_no_torchvision_notices():
    """Defect: every `softalign` command printed transformers' two "requires torchvision" warnings."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision installed there is no notice to silence")
    trigger = "import transformers; transformers.CLIPImageProcessor; transformers.SiglipImageProcessor"
    quiet = "from softalign.cli import quiet_optional_backends; quiet_optional_backends(); " + trigger
    run = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "requires torchvision" not in run.stderr
