"""Bad input (issue 7, item 3): each kind gets an error that names the thing and what was expected.

`CASES` is the catalogue: one `Case` per kind of bad input, with the exception type it must raise and a pattern its
message must contain (the file, field or function, and the expectation). Inputs that must be *accepted* (non-RGB
images are converted; unknown config keys only warn) have `error=None`. Known bugs are `bug=` cases: strict xfails
that document the current behaviour. `attempt(case, root)` runs one case and returns `(kind, first line of the
error)`; `scripts/reliability_report.py` prints them as a table.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from shapes_data import shapes_pairs

from softalign import SoftTokens, SoftTokensConfig, load_soft_tokens, save_soft_tokens
from softalign.convert import load_foreign_tensor
from softalign.eval import parse_metadata_line
from softalign.loaders import unload_soft_tokens
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

NOT_FINITE = (FloatingPointError, ValueError, RuntimeError)  # what "stop" may raise for a NaN / Inf loss


@dataclass(frozen=True)
class Case:
    kind: str  # readable, used as the test id
    run: Callable[[Path], object]  # raises for bad input; returns a short note when the input is accepted
    error: type | tuple | None  # the exception the input must raise; None: it must be accepted
    match: str = ""  # regex its message must contain
    warns: str = ""  # regex of a warning that must be given
    bug: str = ""  # a known bug: the case is a strict xfail with this reason


@dataclass
class Attempt:
    kind: str
    first_line: str  # "ValueError: <first line>", or "accepted: <note>"
    ok: bool
    detail: str
    bug: str = ""


def attempt(case: Case, root: Path) -> Attempt:
    """Run one case in the fresh directory `root`; `ok` says whether it behaved as the catalogue requires."""
    root.mkdir(parents=True, exist_ok=True)
    error: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            note = case.run(root)
        except Exception as raised:  # noqa: BLE001 - every type is judged below
            error, note = raised, None
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    warned = next((m for m in messages if case.warns and re.search(case.warns, m)), "")
    if error is not None:
        text = str(error)
        first = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        if case.error is None:
            return Attempt(case.kind, first, False, f"should have been accepted, raised {first}", case.bug)
        if not isinstance(error, case.error):
            return Attempt(case.kind, first, False, f"expected {case.error}, got {first}", case.bug)
        if not re.search(case.match, text, re.DOTALL):
            return Attempt(case.kind, first, False, f"message {text!r} does not match {case.match!r}", case.bug)
        return Attempt(case.kind, first, True, "", case.bug)
    first = f"accepted: {note}" + (f" (warning: {warned.splitlines()[0]})" if warned else "")
    if case.error is not None:
        return Attempt(case.kind, first, False, f"accepted; expected {case.error} matching {case.match!r}", case.bug)
    if case.warns and not warned:
        return Attempt(case.kind, first, False, f"no warning matching {case.warns!r} among {messages}", case.bug)
    return Attempt(case.kind, first, True, "", case.bug)


# -- builders -------------------------------------------------------------------------------------------------------
PAIRS = shapes_pairs(8)


def _image(mode: str = "RGB", size=(16, 16)) -> Image.Image:
    array = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _folder(root: Path, first: bytes | None = None, name: str = "0.png", lines: list | None = None, n: int = 4):
    """An image folder with `n` good PNGs and captions; `first` replaces the bytes of the first image (None: keep,
    b"<missing>": delete it); `lines` replaces metadata.jsonl (dicts are JSON-encoded, strings written as they are)."""
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    names = [name, *[f"{i}.png" for i in range(1, n)]]
    for file_name, (image, _) in zip(names, PAIRS, strict=False):
        (folder / file_name).write_bytes(_encoded(image))
    if first == b"<missing>":
        (folder / name).unlink()
    elif first is not None:
        (folder / name).write_bytes(first)
    if lines is None:
        lines = [{"file_name": f, "text": caption} for f, (_, caption) in zip(names, PAIRS, strict=False)]
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (folder / "metadata.jsonl").write_text(text, encoding="utf-8")
    return folder


def _config(root: Path, **overrides) -> SoftAlignConfig:
    settings = dict(output_dir=str(root / "run"), max_steps=2, resolution=32, save_steps=0, logging_steps=1)
    return SoftAlignConfig(**{**settings, **overrides})


def _prepare(root: Path, data, **overrides) -> str:
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(root, **overrides), data)
    encoded = trainer.prepare_data()
    return f"{len(encoded)} examples encoded, {len(encoded.stats.skipped)} skipped"


def _images_of_mode(mode: str, fmt: str = "PNG"):
    def run(root: Path):
        folder = _folder(root)
        for i in range(4):
            (folder / f"{i}.png").write_bytes(_encoded(_image(mode), fmt))  # the extension does not matter to PIL
        return _prepare(root, folder) + f" from {mode} {fmt} files"

    return run


def _sixteen_bit_keeps_its_range(root: Path):
    from softalign.data import preprocess

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    image = Image.open(io.BytesIO(_encoded(Image.fromarray(ramp))))
    pixels = preprocess(image, 16, True, "ramp.png")
    share_white = float((pixels > 0.99).float().mean())
    if share_white > 0.5:
        raise ValueError(f"a 16-bit ramp became {share_white:.0%} white (values clipped at 255, not scaled)")
    return "16-bit ramp keeps its range"


def _caption(text):
    return lambda root: _prepare(root, _folder(root, lines=[{"file_name": "0.png", "text": text}]))


def _metadata(lines):
    return lambda root: _prepare(root, _folder(root, lines=lines))


def _parse_only(data: bytes):
    """Only parse metadata.jsonl (one line is fewer than a batch): the caption must come back whole."""

    def run(root: Path):
        from softalign.data import image_folder

        folder = _folder(root)
        (folder / "metadata.jsonl").write_bytes(data)
        captions = [example.caption for example in image_folder(folder)]
        if captions != [json.loads(data)["text"]]:
            raise AssertionError(f"captions came back as {captions!r}")
        return f"parsed {len(captions)} line with its caption intact"

    return run


def _raw_metadata(data: bytes):
    def run(root: Path):
        folder = _folder(root)
        (folder / "metadata.jsonl").write_bytes(data)
        return _prepare(root, folder)

    return run


GOOD_GENEVAL = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}


def _geneval(**changes):
    line = {**GOOD_GENEVAL, **changes}
    return lambda root: parse_metadata_line(json.dumps(line), source="evaluation_metadata.jsonl", line=3)


def _geneval_text(text: str):
    return lambda root: parse_metadata_line(text, source="evaluation_metadata.jsonl", line=3)


def _adapter(root: Path, family: str = "sd15", dim: int = 32) -> Path:
    return save_soft_tokens(SoftTokens(SoftTokensConfig.for_family(family, dim=dim)), root / "adapter")


def _adapter_with(change: Callable[[Path], None], load_into: str | None = None, **adapter):
    def run(root: Path):
        path = _adapter(root, **adapter)
        change(path)
        if load_into is None:
            tokens = SoftTokens.from_pretrained(path)
            return f"read tokens {tuple(tokens.tokens.shape)}"
        injection = load_soft_tokens(tiny_pipeline(load_into), path)
        return f"loaded tokens {tuple(injection.soft_tokens.tokens.shape)}"

    return run


def _edit_config(**changes):
    def change(path: Path):
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return change


def _weights(tensors: dict):
    return lambda path: save_file(tensors, str(path / "adapter_model.safetensors"))


def _truncate(name: str):
    def change(path: Path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return change


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _crafted_pickle(root: Path):
    marker = root / "code-ran"
    torch.save({"weight": _Evil(marker)}, root / "soft_t_tokens.pth")
    try:
        return load_foreign_tensor(root / "soft_t_tokens.pth")
    finally:
        if marker.exists():
            raise AssertionError("the crafted pickle ran code on load")


def _from_dict(data):
    return lambda root: repr(SoftAlignConfig.from_dict(data, source="run.yaml"))[:60]


def _from_yaml(text: str):
    def run(root: Path):
        (root / "run.yaml").write_text(text)
        return repr(SoftAlignConfig.from_file(root / "run.yaml"))[:60]

    return run


def _ddpo_config(**values):
    def run(root: Path):
        from softalign.rl.ddpo_config import DDPOConfig

        return repr(DDPOConfig(output_dir=str(root / "ddpo"), **values))[:60]

    return run


def _nonfinite_loss(value: float, mode: str = "stop"):
    def run(root: Path):
        trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(root, on_nonfinite_loss=mode), PAIRS)
        chunk_loss = trainer._chunk_loss

        def broken(*args, **kwargs):
            loss, diagnostics = chunk_loss(*args, **kwargs)
            return loss + value, diagnostics

        trainer._chunk_loss = broken
        before = {k: v.clone() for k, v in trainer.trained.state_dict().items()}
        state = trainer.train()
        unchanged = all(torch.equal(v, trainer.trained.state_dict()[k]) for k, v in before.items())
        if not unchanged:
            raise AssertionError("a skipped non-finite step changed the parameters")
        return f"{state.skipped_steps} of {trainer.args.max_steps} steps skipped, parameters unchanged"

    return run


def _ddpo(reward=None, loss_factor: float | None = None):
    def run(root: Path):
        from softalign.families import context_dim_of
        from softalign.rl.ddpo_config import DDPOConfig
        from softalign.rl.ddpo_trainer import DDPOTrainer

        pipe = tiny_pipeline("sd15")
        tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=context_dim_of(pipe), init="normal"))
        config = DDPOConfig(
            output_dir=str(root / "ddpo"),
            num_epochs=1,
            sample_num_steps=2,
            sample_batch_size=2,
            sample_num_batches_per_epoch=1,
            train_batch_size=2,
            resolution=32,
        )
        brightness = lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {})  # noqa: E731
        trainer = DDPOTrainer(config, reward or brightness, lambda: ("a photo of a cat", {}), pipe, tokens)
        if loss_factor is not None:
            ppo_loss = trainer._ppo_loss

            def broken(batch, j):
                loss, info = ppo_loss(batch, j)
                return loss * loss_factor, info

            trainer._ppo_loss = broken
        try:
            trainer.train()
        finally:
            unload_soft_tokens(pipe)
        finite = bool(torch.isfinite(tokens.tokens).all())
        return f"trained 1 epoch, tokens finite: {finite}, logged loss {trainer.log_history[-1]['loss']}"

    return run


def _geneval_reward_without_metadata(root: Path):
    from softalign.rl.rewards import GenEvalReward

    reward = GenEvalReward(detector=lambda image: [])
    return reward(torch.rand(2, 3, 16, 16), ("a photo of a dog", "a photo of a cat"), ({}, {}))


def _resume_from(path_of: Callable[[Path], str]):
    def run(root: Path):
        SoftAlignTrainer(tiny_pipeline("sd15"), _config(root, resume_from_checkpoint=path_of(root)), PAIRS).train()
        return "resumed"

    return run


# -- the catalogue ----------------------------------------------------------------------------------------------------
IMG = r"data/0\.png"
META = r"metadata\.jsonl, line 1"
CASES = [
    # images in a metadata.jsonl folder
    Case("image-missing", lambda r: _prepare(r, _folder(r, b"<missing>")),
         FileNotFoundError, rf"Image not found: .*{IMG}"),
    Case("image-corrupt", lambda r: _prepare(r, _folder(r, b"\x89PNG\r\n\x1a\n this is not a png")), ValueError,
         rf"{IMG} is not a readable image \(corrupt or truncated\)"),
    Case("image-truncated", lambda r: _prepare(r, _folder(r, _encoded(_image())[:120])), ValueError,
         rf"{IMG} is not a readable image \(corrupt or truncated\)"),
    Case("image-empty-file", lambda r: _prepare(r, _folder(r, b"")), ValueError, rf"{IMG} is not a readable image"),
    Case("image-tiny-4x4", lambda r: _prepare(r, _folder(r, _encoded(_image(size=(4, 4))))), ValueError,
         rf"{IMG} is 4x4 pixels; images need at least 8"),
    Case("image-too-few-for-a-batch", lambda r: _prepare(r, _folder(r, n=3)), ValueError,
         r"3 usable examples, fewer than one batch \(4 per process"),
    Case("image-corrupt-skipped-when-asked", lambda r: _prepare(r, _folder(r, b"junk", n=5), skip_bad_images=True),
         None),
    Case("image-RGBA-converted", _images_of_mode("RGBA"), None),
    Case("image-L-greyscale-converted", _images_of_mode("L"), None),
    Case("image-P-palette-converted", _images_of_mode("P"), None),
    Case("image-CMYK-jpeg-converted", _images_of_mode("CMYK", "JPEG"), None),
    Case("image-LA-converted", _images_of_mode("LA"), None),
    Case("image-16bit-png-keeps-its-range", _sixteen_bit_keeps_its_range, None),
    # captions
    Case("caption-empty", _caption(""), ValueError, rf"{META}: the caption is empty"),
    Case("caption-whitespace-only", _caption("   \t"), ValueError, rf"{META}: the caption is empty"),
    Case("caption-over-long", _caption("a red circle " * 160), ValueError,
         rf"{META}: the caption has 2080 characters, more than 2000"),
    Case("caption-not-a-string", _caption(42), ValueError, rf"{META}: the caption must be a string, got int"),
    # metadata.jsonl
    Case("metadata-broken-json-line", _metadata([{"file_name": "0.png", "text": "a"}, '{"file_name": "1.png", "te']),
         ValueError, r"metadata\.jsonl, line 2: not valid JSON"),
    Case("metadata-missing-text-key", _metadata([{"file_name": "0.png", "caption": "a red circle"}]), ValueError,
         rf"{META}: expected an object with 'file_name' and 'text', got \['caption', 'file_name'\]"),
    Case("metadata-missing-file_name-key", _metadata([{"text": "a red circle"}]), ValueError,
         rf"{META}: expected an object with 'file_name' and 'text'"),
    Case("metadata-line-not-an-object", _metadata([["0.png", "a red circle"]]), ValueError,
         rf"{META}: expected an object with 'file_name' and 'text', got list"),
    Case("metadata-empty-file", _metadata([]), ValueError, r"metadata\.jsonl lists no images"),
    Case("metadata-file-missing", lambda r: _prepare(r, r), FileNotFoundError,
         r"has no metadata\.jsonl \(lines of \{'file_name': \.\.\., 'text': \.\.\.\}\)"),
    Case("data-folder-missing", lambda r: _prepare(r, r / "nowhere"), FileNotFoundError,
         r"Image folder not found: .*nowhere"),
    Case("metadata-not-utf8", _raw_metadata(b'{"file_name": "0.png", "text": "caf\xe9"}\n'), ValueError,
         r"metadata\.jsonl.*(UTF-8|utf-8)"),
    Case("metadata-caption-with-U+2028", _parse_only(
        json.dumps({"file_name": "0.png", "text": "one\u2028two"}, ensure_ascii=False).encode() + b"\n"), None),
    Case("metadata-deeply-nested-line", _raw_metadata(b"[" * 100_000 + b"\n"), ValueError, r"metadata\.jsonl, line 1"),
    # GenEval metadata
    Case("geneval-unknown-tag", _geneval(tag="counting_objects"), ValueError,
         r"evaluation_metadata\.jsonl, line 3: unknown tag 'counting_objects'; expected one of \['single_object'"),
    Case("geneval-count-as-string", _geneval(include=[{"class": "dog", "count": "2"}]), ValueError,
         r"line 3: include\[0\]: 'count' must be a positive integer, got '2'"),
    Case("geneval-count-zero", _geneval(include=[{"class": "dog", "count": 0}]), ValueError,
         r"line 3: include\[0\]: 'count' must be a positive integer, got 0"),
    Case("geneval-position-points-forward",
         _geneval(tag="position", include=[{"class": "dog", "count": 1, "position": ["above", 1]},
                                           {"class": "cat", "count": 1}]), ValueError,
         r"line 3: include\[0\]\.position: the first include clause cannot have a position"),
    Case("geneval-unknown-relation",
         _geneval(tag="position", include=[{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["beside", 0]}]), ValueError,
         r"include\[1\]\.position: unknown relation 'beside'; expected one of \['left of'"),
    Case("geneval-missing-include", lambda r: parse_metadata_line(
        json.dumps({"tag": "counting", "prompt": "two dogs"}), source="evaluation_metadata.jsonl", line=3),
         ValueError, r"line 3: missing key\(s\) \['include'\]; a line needs 'tag', 'include', 'prompt'"),
    Case("geneval-unknown-clause-key", _geneval(include=[{"class": "dog", "count": 2, "colour": "red"}]), ValueError,
         r"include\[0\]: unknown key\(s\) \['colour'\]; expected only \['class', 'color', 'count', 'position'\]"),
    Case("geneval-broken-json", _geneval_text('{"tag": "counting", '), ValueError,
         r"evaluation_metadata\.jsonl, line 3: broken JSON"),
    # adapters
    Case("adapter-directory-missing", lambda r: SoftTokens.from_pretrained(r / "nowhere"), FileNotFoundError,
         r"Soft-token adapter directory not found: .*nowhere"),
    Case("adapter-missing-weights-file", _adapter_with(lambda p: (p / "adapter_model.safetensors").unlink()),
         FileNotFoundError, r"adapter is missing adapter_model\.safetensors \(expected adapter_config\.json and"),
    Case("adapter-missing-config-file", _adapter_with(lambda p: (p / "adapter_config.json").unlink()),
         FileNotFoundError, r"adapter is missing adapter_config\.json"),
    Case("adapter-wrong-tensor-shape",
         _adapter_with(_weights({"tokens": torch.zeros(2, 4, 16), "timestep_embedding.weight": torch.zeros(100, 32)})),
         ValueError, r"adapter_model\.safetensors: tensor 'tokens' has shape \(2, 4, 16\), its config expects "
         r"\(2, 4, 32\)"),
    Case("adapter-missing-tensor", _adapter_with(_weights({"tokens": torch.zeros(2, 4, 32)})), ValueError,
         r"holds tensors \['tokens'\], but its config expects \['timestep_embedding\.weight', 'tokens'\]"),
    Case("adapter-wrong-family", _adapter_with(lambda p: None, load_into="sd15", family="sd3"), ValueError,
         r"for a mmdit denoiser \(family sd3, tokens \(2, 5, 4, 32\)\), but the model is a UNet2DConditionModel"),
    Case("adapter-wrong-width", _adapter_with(lambda p: None, load_into="sd15", dim=64), ValueError,
         r"Soft tokens of shape \(2, 4, 64\) do not fit this model: its context width is 32"),
    Case("adapter-wrong-format", _adapter_with(_edit_config(format="peft")), ValueError,
         r"adapter_config\.json is not a softalign soft-token config \(format 'peft', expected "
         r"'softalign\.soft_tokens'\)"),
    Case("adapter-newer-version-unknown-keys",
         _adapter_with(_edit_config(softalign_version="9.0.0", rope_scaling=2.0)), None,
         warns=r"adapter_config\.json: ignoring unknown SoftTokensConfig keys \['rope_scaling'\] \(written by a newer"),
    Case("adapter-config-invalid-value", _adapter_with(_edit_config(n_tokens=0)), ValueError,
         r"adapter_config\.json: invalid SoftTokensConfig: SoftTokensConfig\.n_tokens must be a positive integer"),
    Case("adapter-config-not-json", _adapter_with(lambda p: (p / "adapter_config.json").write_text("{oops")),
         ValueError, r"adapter_config\.json is not valid JSON"),
    Case("adapter-weights-truncated", _adapter_with(_truncate("adapter_model.safetensors")), ValueError,
         r"adapter_model\.safetensors is not a readable safetensors file"),
    Case("adapter-weights-nan",
         _adapter_with(_weights({"tokens": torch.full((2, 4, 32), float("nan")),
                                 "timestep_embedding.weight": torch.zeros(100, 32)})),
         ValueError, r"adapter_model\.safetensors: tensor 'tokens' contains NaN or Inf values"),
    Case("adapter-weights-float8",
         _adapter_with(_weights({"tokens": torch.zeros(2, 4, 32, dtype=torch.float8_e4m3fn),
                                 "timestep_embedding.weight": torch.zeros(100, 32, dtype=torch.float8_e4m3fn)})),
         ValueError, r"adapter_model\.safetensors.*float"),
    Case("pth-crafted-pickle-runs-code", _crafted_pickle, ValueError,
         r"Refused to load .*soft_t_tokens\.pth: .*weights_only=True"),
    # configs
    Case("config-unknown-key", _from_dict({"max_steps": 5, "learning_rte": 1e-3}), None,
         warns=r"run\.yaml: ignoring unknown SoftAlignConfig keys \['learning_rte'\]"),
    Case("config-wrong-type", _from_dict({"max_steps": "1000"}), ValueError,
         r"SoftAlignConfig\.max_steps must be of type int, got '1000' \(str\)"),
    Case("config-bool-for-int", _from_dict({"train_batch_size": True}), ValueError,
         r"SoftAlignConfig\.train_batch_size must be of type int, got True \(bool\)"),
    Case("config-negatives-ge-batch-size", _from_dict({"negatives_per_positive": 4, "train_batch_size": 4}),
         ValueError, r"train_batch_size \(4\) must be a multiple of negatives_per_positive \+ 1 \(5\)"),
    Case("config-zero-steps", _from_dict({"max_steps": 0}), ValueError,
         r"SoftAlignConfig\.max_steps must be a positive integer, got 0"),
    Case("config-negative-learning-rate", _from_dict({"learning_rate": -1e-3}), ValueError,
         r"SoftAlignConfig\.learning_rate must be positive, got -0\.001"),
    Case("config-unknown-objective", _from_dict({"objective": "dpo"}), ValueError,
         r"SoftAlignConfig\.objective must be one of \('agsm', 'softrepa', 'diffusion'\), got 'dpo'"),
    Case("config-empty-timestep-range", _from_dict({"min_timestep": 500, "max_timestep": 500}), ValueError,
         r"Need 0 <= min_timestep < max_timestep <= 1000, got 500 and 500"),
    Case("config-not-a-mapping", _from_yaml("- max_steps: 5\n"), ValueError,
         r"run\.yaml: expected a mapping of SoftAlignConfig fields, got list"),
    Case("config-broken-yaml", _from_yaml("max_steps: [5\n"), ValueError, r"run\.yaml is not valid YAML"),
    Case("config-file-missing", lambda r: SoftAlignConfig.from_file(r / "run.yaml"), FileNotFoundError,
         r"Config file not found: .*run\.yaml"),
    Case("config-yaml-python-tag", _from_yaml("max_steps: !!python/object/apply:os.system ['true']\n"), ValueError,
         r"run\.yaml is not valid YAML"),
    Case("config-nan-gamma", _from_dict({"gamma_pos": float("nan")}), ValueError, r"gamma_pos"),
    Case("config-int-and-str-keys-warn", _from_yaml("1: 2\nlearning_rte: 0.1\n"), None),
    Case("ddpo-config-batch-mismatch", _ddpo_config(sample_batch_size=3, sample_num_batches_per_epoch=1,
                                                    train_batch_size=2), ValueError,
         r"sample_batch_size \* sample_num_batches_per_epoch \(3\) must be a multiple of train_batch_size \(2\)"),
    Case("ddpo-config-zero-eta", _ddpo_config(sample_eta=0.0), ValueError,
         r"DDPOConfig\.sample_eta must be > 0 \(the log-probs need noise\)"),
    Case("resume-checkpoint-missing", _resume_from(lambda r: str(r / "checkpoint-7")), FileNotFoundError,
         r"Checkpoint not found: .*checkpoint-7"),
    # non-finite losses
    Case("loss-nan-stops", _nonfinite_loss(float("nan")), NOT_FINITE,
         r"Non-finite loss \(nan\) at step 0; stopping \(set on_nonfinite_loss='skip'"),
    Case("loss-inf-stops", _nonfinite_loss(float("inf")), NOT_FINITE, r"Non-finite loss \(inf\) at step 0"),
    Case("loss-nan-skipped-when-asked", _nonfinite_loss(float("nan"), "skip"), None),
    Case("ddpo-loss-nan", _ddpo(loss_factor=float("nan")), NOT_FINITE, r"(?i)non-finite|nan"),
    # rewards
    Case("reward-wrong-shape", _ddpo(lambda i, p, m: (torch.zeros(3), {})), ValueError,
         r"reward_fn returned 3 rewards for 2 images"),
    Case("reward-nan", _ddpo(lambda i, p, m: (torch.tensor([0.5, float("nan")]), {})), ValueError,
         r"reward_fn returned non-finite rewards: \[0\.5, nan\]"),
    Case("reward-inf", _ddpo(lambda i, p, m: (torch.tensor([float("inf"), 0.5]), {})), ValueError,
         r"reward_fn returned non-finite rewards: \[inf, 0\.5\]"),
    Case("reward-none", _ddpo(lambda i, p, m: (None, {})), ValueError, r"reward_fn"),
    Case("reward-not-a-tuple", _ddpo(lambda i, p, m: torch.zeros(4)), ValueError, r"reward_fn"),
    Case("geneval-reward-without-metadata", _geneval_reward_without_metadata, ValueError,
         r"GenEvalReward needs each prompt's GenEval metadata \(with 'tag' and 'include'\), got \{\} for prompt "
         r"'a photo of a dog'"),
]  # fmt: skip


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {case.bug}")] if case.bug else []
    return pytest.param(case, id=case.kind, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case, tmp_path):
    result = attempt(case, tmp_path)
    assert result.ok, f"{case.kind}: {result.detail}"


def test_the_catalogue_covers_at_least_twenty_kinds_of_bad_input():
    kinds = [c.kind for c in CASES]
    assert len(kinds) == len(set(kinds))
    refused = [c for c in CASES if c.error is not None and not c.bug]
    assert len(refused) >= 20
    families = {c.kind.split("-")[0] for c in refused}
    assert {"image", "caption", "metadata", "geneval", "adapter", "config", "loss", "reward"} <= families


def test_file_names_outside_the_folder_and_non_strings_are_refused(tmp_path):
    from softalign.data import image_folder
    from softalign.soft_tokens import SoftTokensConfig

    folder = tmp_path / "data"
    folder.mkdir()
    for name, message in (("../secret.png", "points outside the image folder"), (None, "must be a non-empty string")):
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a cat"}) + "\n")
        with pytest.raises(ValueError, match=message):
            image_folder(folder)
    with pytest.raises(ValueError, match="timestep_embedding must be true or false"):
        SoftTokensConfig(architecture="unet", dim=8, timestep_embedding="no")
    with pytest.raises(ValueError, match="init_std"):
        SoftTokensConfig(architecture="unet", dim=8, init_std=float("inf"))
