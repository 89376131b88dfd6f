"""Small helpers shared by the tests: denoiser inputs and a recorder of the context each block sees."""

from __future__ import annotations

import torch

from softalign.families import denoiser_of, latent_image_ids


def denoiser_inputs(pipe, batch: int = 2, text_len: int = 6, timestep=537, seed: int = 0) -> dict:
    """Random keyword inputs for the pipeline's denoiser (SDXL gets its added conditioning)."""
    g = torch.Generator().manual_seed(seed)
    denoiser = denoiser_of(pipe)
    config = denoiser.config
    size = getattr(config, "sample_size", None)
    if hasattr(config, "guidance_embeds"):  # FLUX.1: packed latents, position ids, t / 1000, guidance
        grid = 4
        return {
            "hidden_states": torch.randn(batch, grid * grid, config.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), float(timestep) / 1000),
            "guidance": torch.full((batch,), 3.5),
            "txt_ids": torch.zeros(text_len, 3),
            "img_ids": latent_image_ids(grid, grid),
        }
    if hasattr(pipe, "transformer"):
        return {
            "hidden_states": torch.randn(batch, config.in_channels, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), float(timestep)),
        }
    inputs = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=g),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(batch, text_len, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return inputs


def run_denoiser(pipe, inputs: dict) -> torch.Tensor:
    return denoiser_of(pipe)(**inputs).sample


class ContextRecorder:
    """Records `encoder_hidden_states` as each block receives it (registered after the soft-token hooks)."""

    def __init__(self, blocks):
        self.seen: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _hook(self, index):
        def record(module, args, kwargs):
            context = kwargs.get("encoder_hidden_states")
            if context is None and len(args) > 1:
                context = args[1]
            self.seen[index] = None if context is None else context.detach().clone()

        return record

    def remove(self):
        for handle in self._handles:
            handle.remove()


def unet_cross_blocks(unet) -> dict[str, list]:
    return {
        "down": [b for b in unet.down_blocks if getattr(b, "has_cross_attention", False)],
        "mid": [unet.mid_block] if getattr(unet.mid_block, "has_cross_attention", False) else [],
        "up": [b for b in unet.up_blocks if getattr(b, "has_cross_attention", False)],
    }
