"""One CLIP core for every CLIP-based scorer: a `transformers.CLIPModel`, its tokenizer and its image transform.

Scorers that share weights share one core: [`CLIPCore.from_pretrained`] caches by (directory, device, dtype), so
CLIPScore and the aesthetic head over the same CLIP ViT-L/14, or GenEval's colour classifier, load it once.

Two image paths:
- PIL ([`CLIPCore.pil_pixels`]): CLIP's own transform (OpenAI's, open_clip's, transformers' `CLIPImageProcessor`):
  resize the short side to the crop size with PIL bicubic (the long side `int(size * long / short)`, as
  torchvision), centre crop (offsets `round((H - size) / 2)`), scale to [0, 1], normalise with the directory's
  `image_mean` / `image_std`;
- tensor ([`CLIPCore.tensor_pixels`]): the same steps on a `(B, 3, H, W)` tensor in [0, 1] with
  `torch.nn.functional.interpolate(mode="bicubic", antialias=True)`, differentiable. PIL's bicubic kernel has
  `a = -0.5`, torch's `a = -0.75`, so the two paths agree closely but not exactly; rewards for training use the
  tensor path, metrics the PIL path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..eval.local import local_dir, read_config, require_model_type, require_tokenizer

_CORES: dict[tuple, CLIPCore] = {}


class CLIPCore:
    """A CLIP model with its tokenizer and image transform; embeddings are the projected (not normalised) features.

    Args:
        model (`transformers.CLIPModel`): both towers and their projections.
        tokenizer: a CLIP tokenizer (`CLIPTokenizer` / `CLIPTokenizerFast`).
        image_size (`int`): the crop size the vision tower takes.
        mean, std (`tuple[float, float, float]`): per-channel normalisation in [0, 1] units.
    """

    def __init__(self, model, tokenizer, image_size: int, mean, std):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> CLIPCore:
        """Load (once per directory, device and dtype) a local CLIP directory: `config.json`, weights, a tokenizer
        (`tokenizer.json`, or `vocab.json` + `merges.txt`) and `preprocessor_config.json`; never downloads.

        Raises:
            `FileNotFoundError`: a file is missing (named). `ValueError`: the directory is not a `CLIPModel`
                with both projections (e.g. a `CLIPVisionModel` or a text encoder alone).
        """
        expected = "a CLIPModel directory (config.json, model.safetensors, tokenizer files, preprocessor_config.json)"
        folder = local_dir(path, "CLIP", expected)
        config = read_config(folder)
        require_model_type(folder, config, ("clip",), "a CLIPModel with text and image projections")
        require_tokenizer(folder, f"CLIP ({folder})")
        processor = folder / "preprocessor_config.json"
        if not processor.is_file():
            raise FileNotFoundError(
                f"CLIP: {processor} is missing; expected the image processor config (crop_size, image_mean, "
                "image_std) that CLIPProcessor.save_pretrained writes"
            )
        key = (str(folder.resolve()), str(torch.device(device or "cpu")), str(torch_dtype))
        if key not in _CORES:
            _CORES[key] = cls._load(folder, processor, device, torch_dtype)
        return _CORES[key]

    @classmethod
    def _load(cls, folder: Path, processor: Path, device, torch_dtype) -> CLIPCore:
        from transformers import AutoTokenizer, CLIPModel

        settings = json.loads(processor.read_text(encoding="utf-8"))
        crop = settings.get("crop_size", 224)
        size = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        mean, std = settings.get("image_mean"), settings.get("image_std")
        if size is None or mean is None or std is None:
            raise ValueError(f"{processor}: expected crop_size, image_mean and image_std, got {sorted(settings)}")
        model = CLIPModel.from_pretrained(
            folder, local_files_only=True, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        if device is not None:
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, size, mean, std)

    @property
    def device(self) -> torch.device:
        """Where the CLIP model's weights live."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The CLIP model's weight dtype."""
        return next(self.model.parameters()).dtype

    def pil_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP's transform on PIL images -> `(B, 3, S, S)` float32 on the core's device."""
        return pil_pixels(images, self.image_size, self.mean, self.std).to(self.device)

    def tensor_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The same transform on `(B, 3, H, W)` images in [0, 1], differentiable -> `(B, 3, S, S)`."""
        return tensor_pixels(images, self.image_size, self.mean, self.std).to(self.device)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S, S)` normalised pixels -> `(B, D)` projected image features (float32)."""
        vision = self.model.vision_model(pixel_values=pixels.to(self.dtype))
        return self.model.visual_projection(vision.pooler_output).float()

    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Texts -> `(N, D)` projected text features (float32); truncated to the model's 77 positions."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.model.text_projection(text.pooler_output).float()


def _normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _resized(width: int, height: int, size: int) -> tuple[int, int]:
    # torchvision's Resize(int) on the short side: the long side is truncated, not rounded
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def pil_pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """CLIP's (and BLIP's, ImageReward's) PIL transform: short side to `size` with bicubic, centre crop, [0, 1],
    normalise -> `(B, 3, size, size)` float32."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        width, height = _resized(*rgb.size, size)
        rgb = rgb.resize((width, height), Image.BICUBIC)
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        rgb = rgb.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    return _normalise(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), mean, std)


def tensor_pixels(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[`pil_pixels`] on `(B, 3, H, W)` tensors in [0, 1], differentiable (torch bicubic with antialiasing)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a (B, 3, H, W) tensor in [0, 1], got {shape}")
    height, width = images.shape[-2:]
    new_w, new_h = _resized(width, height, size)
    pixels = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _normalise(pixels[:, :, top : top + size, left : left + size], mean, std)
