"""FLUX.1 in training: the pipeline's own packing, ids, schedule and guidance, and what AGSM's EMA guidance means."""

import pytest
import torch
from shapes_data import shapes_pairs

from softalign import SoftAlignConfig, SoftAlignTrainer
from softalign.families import backbone_for, latent_image_ids, pack_latents, unpack_latents
from softalign.testing import tiny_pipeline

CALL = dict(prompt="a photo of a red cat", num_inference_steps=3, height=32, width=32, output_type="np")


class TransformerCalls:
    """Records the keyword arguments of every transformer call."""

    def __init__(self, transformer):
        self.calls = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def remove(self):
        self._handle.remove()


def test_packing_and_image_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    square = torch.randn(2, 4, 8, 8)
    assert torch.equal(unpack_latents(pack_latents(square)), square)
    assert torch.equal(
        unpack_latents(pack_latents(square)), FluxPipeline._unpack_latents(pack_latents(square), 8, 8, 1)
    )
    assert torch.equal(latent_image_ids(4, 3), FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="square grid"):
        unpack_latents(torch.randn(1, 6, 16))


def test_predict_is_the_pipelines_transformer_call_and_the_sampling_schedule_its_own():
    pipe = tiny_pipeline("flux")
    backbone = backbone_for(pipe)
    recorder = TransformerCalls(pipe.transformer)
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, out: outputs.append(out[0]), with_kwargs=True)
    pipe(**CALL, generator=torch.Generator().manual_seed(0))
    recorder.remove()
    handle.remove()
    stock_timesteps = pipe.scheduler.timesteps.clone()
    first = recorder.calls[0]
    assert first["guidance"].tolist() == [3.5] and backbone.guidance_scale == 3.5  # the pipeline's default
    conditioning = backbone.encode_prompts([CALL["prompt"]])
    assert torch.equal(conditioning["prompt_embeds"], first["encoder_hidden_states"])
    assert torch.equal(conditioning["pooled_prompt_embeds"], first["pooled_projections"])
    with torch.no_grad():
        ours = backbone.predict(first["hidden_states"], first["timestep"] * 1000, conditioning)
    assert torch.allclose(ours, outputs[0], atol=1e-6)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    backbone.set_sampling_timesteps(scheduler, 3, "cpu", first["hidden_states"])
    assert torch.equal(scheduler.timesteps, stock_timesteps)


def test_training_levels_are_the_schedulers_resolution_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = tiny_pipeline("flux")
    backbone = backbone_for(pipe)
    t = torch.tensor([0, 100, 500, 999])
    for length in (64, 1024, 4096):
        shifted = backbone.training_timesteps(t, torch.zeros(4, length, 16))
        mu = calculate_shift(length)  # FLUX.1 [dev]'s scheduler uses the function's defaults
        expected = pipe.scheduler.time_shift(mu, 1.0, t.double() / 1000).float() * 1000
        expected[0] = 0.0  # the clean end of the schedule stays clean
        assert torch.allclose(shifted, expected, atol=1e-3), length
    big = backbone.training_timesteps(t, torch.zeros(4, 4096, 16))
    assert (big[1:] > t[1:]).all()  # large images are trained at noisier levels, as they are sampled


def test_every_agsm_prediction_online_and_ema_carries_the_distilled_guidance(tmp_path):
    """FLUX.1 [dev] has no true classifier-free guidance: the pipeline makes ONE conditional call per step with the
    guidance embedding. AGSM's "guidance" is not CFG: its direction Delta_j = pred_EMA_j - sum_k w_k pred_EMA_k compares
    the EMA tokens' predictions for the candidate captions, all made at the distilled guidance the pipeline samples
    with, so the tokens learn the alignment direction of the model as it is used. Both trainers' calls carry it."""
    pipe = tiny_pipeline("flux")
    args = SoftAlignConfig(output_dir=str(tmp_path), max_steps=1, resolution=32, save_steps=0, train_batch_size=4)
    trainer = SoftAlignTrainer(pipe, args, shapes_pairs(8))
    trainer.prepare_data()
    recorder = TransformerCalls(pipe.transformer)
    trainer.train()
    recorder.remove()
    rows = sum(call["hidden_states"].shape[0] for call in recorder.calls)
    assert rows == 2 * 4 * 4  # 4 images x 4 captions, online and EMA
    assert all(torch.equal(call["guidance"], torch.full_like(call["guidance"], 3.5)) for call in recorder.calls)
    timesteps = torch.cat([call["timestep"] for call in recorder.calls])
    assert torch.equal(timesteps, timesteps[:1].expand_as(timesteps))  # one level shared by every pair


def test_a_model_without_guidance_embedding_trains_without_one(tmp_path):
    pipe = tiny_pipeline("flux", guidance_embeds=False)  # as FLUX.1 [schnell]
    assert backbone_for(pipe).guidance_scale is None
    args = SoftAlignConfig(output_dir=str(tmp_path), max_steps=1, resolution=32, save_steps=0)
    trainer = SoftAlignTrainer(pipe, args, shapes_pairs(8))
    recorder = TransformerCalls(pipe.transformer)
    trainer.train()
    recorder.remove()
    assert recorder.calls and all(call["guidance"] is None for call in recorder.calls)


def test_packed_latents_are_cached_and_reused(tmp_path):
    def encode(pipe):
        args = SoftAlignConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), resolution=32)
        return SoftAlignTrainer(pipe, args, shapes_pairs(8)).prepare_data()

    first = encode(tiny_pipeline("flux"))
    assert first.latent_mean.shape == (8, 64, 16)  # (images, 8 x 8 patches, 4 channels x 2 x 2)
    assert first.conditioning["prompt_embeds"].shape[1] == 512  # the pipeline's T5 length
    again = encode(tiny_pipeline("flux"))
    assert (again.stats.images_encoded, again.stats.captions_encoded, again.stats.images_reused) == (0, 0, 8)
    assert torch.equal(again.latent_mean, first.latent_mean)
