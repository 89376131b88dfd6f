"""Put soft tokens into a frozen denoiser's text context with module hooks; no forward pass is re-implemented.

One forward pre-hook on the denoiser reads the timestep (and, for MMDiT, the text length L); one pre-hook per chosen
block rewrites that block's `encoder_hidden_states`:

- UNet (SD1.x/2.x, SDXL): the cross-attention blocks of the chosen groups (down / mid / up) see
  `[h_0 (BOS), s_1..s_n, h_1..h_L]`;
- MMDiT (SD3, SD3.5): before every transformer block the context is cut back to the L text tokens, then blocks
  i < n_layers get their own tokens appended `[h, s^i]` (AGSM) or prepended `[s^i, h]` (SoftREPA).
- MMDiT with rotary ids (FLUX.1): the rotary embedding is built once from `cat(txt_ids, img_ids)`, so the text stream
  cannot grow inside a block. The denoiser's pre-hook reserves `n_tokens` slots once: zero rows appended (or
  prepended) to `encoder_hidden_states` and zero rows to `txt_ids` (FLUX's text ids are all zero). Each chosen block
  (the first `n_layers` of the double-stream, single-stream or all blocks) overwrites the slots with its own tokens;
  the other blocks see the slots as the stream hands them on (before the first chosen block: the
  `context_embedder`'s image of zero rows, i.e. its bias).

Because only hooks are added, the stock `pipe(prompt)`, PEFT LoRA, gradient checkpointing and external trainers (TRL)
work unchanged, and after `detach()` the denoiser is bit-identical to the untouched model.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .families import INJECTION_ATTRIBUTE, architecture_of, context_dim_of, denoiser_of
from .soft_tokens import SoftTokens

_ATTRIBUTE = INJECTION_ATTRIBUTE


def _argument_index(module: nn.Module, name: str) -> int | None:
    """Position of argument `name` in `module.forward`, for hooks that see it passed positionally
    (SD3 blocks under gradient checkpointing are called as `checkpoint(block, hidden, context, temb, ...)`)."""
    names = list(inspect.signature(module.forward).parameters)
    return names.index(name) if name in names else None


def _get_argument(args, kwargs, name, index):
    if name in kwargs:
        return kwargs[name]
    if index is not None and index < len(args):
        return args[index]
    return None


def _set_argument(args, kwargs, name, index, value):
    if name in kwargs or index is None or index >= len(args):
        kwargs = {**kwargs, name: value}
    else:
        args = args[:index] + (value,) + args[index + 1 :]
    return args, kwargs


class SoftTokenInjection:
    """Soft tokens attached to one denoiser. Create it with [`attach_soft_tokens`].

    Attributes:
        soft_tokens ([`SoftTokens`]): the parameters injected (shared, not copied: training them trains this).
        bank_ids (`torch.LongTensor`, *optional*): bank of each batch row for the next calls; `None` means
            `default_bank` for every row (psi+ in both classifier-free-guidance branches at inference).
        enabled (`bool`): when `False` the hooks pass everything through untouched (e.g. the reference model of
            Diffusion-DPO).
    """

    def __init__(self, denoiser: nn.Module, soft_tokens: SoftTokens, default_bank: int = 0):
        self.denoiser = denoiser
        self.soft_tokens = soft_tokens
        self.default_bank = default_bank
        self.bank_ids: torch.Tensor | None = None
        self.enabled = True
        self._handles: list = []
        self._timesteps = None
        self._text_len = None
        self._call_tokens = None  # the UNet tokens of the denoiser call in progress, shared by its blocks
        check_compatible(soft_tokens.config, denoiser)
        if not 0 <= default_bank < soft_tokens.n_banks:
            raise ValueError(f"default_bank must lie in [0, {soft_tokens.n_banks - 1}], got {default_bank}.")

    # -- attach / detach ----------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> SoftTokenInjection:
        """Register the hooks on the denoiser (idempotent); refuses a denoiser that carries other soft tokens."""
        if self.attached:
            return self
        existing = getattr(self.denoiser, _ATTRIBUTE, None)
        if existing is not None:
            raise ValueError(
                "This denoiser already carries soft tokens; detach them first (`unload_soft_tokens(pipe)` or "
                "`injection.detach()`)."
            )
        timestep_index = _argument_index(self.denoiser, "timestep")
        context_index = _argument_index(self.denoiser, "encoder_hidden_states")
        ids_index = _argument_index(self.denoiser, "txt_ids")
        rope = self.soft_tokens.config.architecture == "mmdit_rope"

        def read_denoiser_inputs(module, args, kwargs):
            self._timesteps = _get_argument(args, kwargs, "timestep", timestep_index)
            context = _get_argument(args, kwargs, "encoder_hidden_states", context_index)
            self._text_len = None if context is None else context.shape[1]
            # Every UNet block of one call gets the same tokens: build them once here (one bank lookup and timestep
            # embedding per call, not per block). UNet blocks are no gradient-checkpointing regions themselves (the
            # UNet checkpoints inside them), so no recomputation re-runs the block hooks; MMDiT blocks are such
            # regions and keep building their tokens in their own hook.
            self._call_tokens = None
            if self.enabled and context is not None and self.soft_tokens.config.architecture == "unet":
                self._call_tokens = self.soft_tokens(*self._rows(context.shape[0]))

            if not rope or context is None or not self.enabled:
                return None
            if self._timesteps is not None:  # FLUX.1 is called with t / 1000 and scales it back inside; rounding
                # undoes the float32 error of t / 1000, so that t = 540 lands in bucket 54, not 53
                self._timesteps = (torch.as_tensor(self._timesteps).double() * 1000).round(decimals=3)
            return self._reserve_slots(args, kwargs, context, context_index, ids_index)

        def forget_call_tokens(module, args, output):
            self._call_tokens = None  # a block called on its own later must not see this call's tokens

        self._handles.append(self.denoiser.register_forward_pre_hook(read_denoiser_inputs, with_kwargs=True))
        self._handles.append(self.denoiser.register_forward_hook(forget_call_tokens))
        for layer, block in self._target_blocks():
            self._handles.append(block.register_forward_pre_hook(self._block_hook(block, layer), with_kwargs=True))
        setattr(self.denoiser, _ATTRIBUTE, self)
        return self

    def detach(self) -> None:
        """Remove every hook: the denoiser is then bit-identical to the untouched model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._timesteps = self._text_len = self._call_tokens = None
        if getattr(self.denoiser, _ATTRIBUTE, None) is self:
            delattr(self.denoiser, _ATTRIBUTE)

    def __enter__(self) -> SoftTokenInjection:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per-call controls ---------------------------------------------------------------------------------------
    @contextmanager
    def use_banks(self, bank_ids: torch.Tensor | int):
        """Route each batch row through its own bank for the calls inside the block.

        Example:
            ```py
            >>> with injection.use_banks(torch.tensor([0, 1, 1, 1])):  # one positive, three negatives
            ...     pred = unet(x_t, t, encoder_hidden_states=context).sample
            ```
        """
        previous = self.bank_ids
        self.bank_ids = torch.as_tensor(bank_ids, dtype=torch.long).reshape(-1)
        try:
            yield self
        finally:
            self.bank_ids = previous

    @contextmanager
    def swapped(self, soft_tokens: SoftTokens):
        """Inject other tokens of the same config (e.g. the EMA copy) for the calls inside the block."""
        if soft_tokens.config.parameter_shapes() != self.soft_tokens.config.parameter_shapes():
            raise ValueError("swapped() needs soft tokens of the same shapes as the attached ones.")
        previous, self.soft_tokens = self.soft_tokens, soft_tokens
        try:
            yield self
        finally:
            self.soft_tokens = previous

    @contextmanager
    def disabled(self):
        """Run the untouched denoiser inside the block (hooks stay registered)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    # -- internals ---------------------------------------------------------------------------------------------
    def _reserve_slots(self, args, kwargs, context, context_index, ids_index):
        """The rotary layout's one change to the denoiser's inputs: `n_tokens` zero rows in the text context and in
        `txt_ids` (2-d `(L, 3)`, or the deprecated 3-d `(B, L, 3)`), after the text or before it."""
        n, append = self.soft_tokens.config.n_tokens, self.soft_tokens.config.position == "append"
        zeros = context.new_zeros(context.shape[0], n, context.shape[2])
        context = torch.cat([context, zeros] if append else [zeros, context], dim=1)
        args, kwargs = _set_argument(args, kwargs, "encoder_hidden_states", context_index, context)
        ids = _get_argument(args, kwargs, "txt_ids", ids_index)
        if ids is not None:
            slot_ids = ids.new_zeros(*ids.shape[:-2], n, ids.shape[-1])
            ids = torch.cat([ids, slot_ids] if append else [slot_ids, ids], dim=-2)
            args, kwargs = _set_argument(args, kwargs, "txt_ids", ids_index, ids)
        return args, kwargs

    def _target_blocks(self) -> list[tuple[int | None, nn.Module]]:
        config = self.soft_tokens.config
        if config.architecture == "mmdit":
            return list(enumerate(self.denoiser.transformer_blocks))
        if config.architecture == "mmdit_rope":  # only the chosen blocks are hooked: the others keep the stream
            return list(enumerate(rope_blocks(self.denoiser, config.blocks)))[: config.n_layers]
        groups = {
            "down": list(self.denoiser.down_blocks),
            "mid": [self.denoiser.mid_block] if self.denoiser.mid_block is not None else [],
            "up": list(self.denoiser.up_blocks),
        }
        blocks = []
        for group in config.unet_blocks:
            found = [b for b in groups[group] if getattr(b, "has_cross_attention", False)]
            if not found:
                raise ValueError(
                    f"Soft tokens target the UNet's {group!r} blocks, but this UNet has no cross-attention block there."
                )
            blocks += [(None, block) for block in found]
        return blocks

    def _rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.soft_tokens.tokens.device
        banks = self.bank_ids
        if banks is None:
            banks = torch.full((batch,), self.default_bank, dtype=torch.long, device=device)
        else:
            banks = banks.to(device)
            if banks.numel() == 1:
                banks = banks.expand(batch)
            elif banks.numel() != batch:
                raise ValueError(f"bank_ids has {banks.numel()} entries, but the denoiser batch has {batch} rows.")
        timesteps = self._timesteps
        if self.soft_tokens.timestep_embedding is not None:
            if timesteps is None:
                raise ValueError("The denoiser was called without a timestep; the soft tokens' timestep part needs it.")
            timesteps = torch.as_tensor(timesteps).reshape(-1).to(device)
            if timesteps.numel() == 1:
                timesteps = timesteps.expand(batch)
            elif timesteps.numel() != batch:
                raise ValueError(f"Got {timesteps.numel()} timesteps for a denoiser batch of {batch} rows.")
        return banks, timesteps

    def _block_hook(self, block: nn.Module, layer: int | None):
        context_index = _argument_index(block, "encoder_hidden_states")
        config = self.soft_tokens.config
        # MMDiT blocks are checkpointed whole (`checkpoint(block, hidden, context, ...)`), so under gradient
        # checkpointing this hook runs again in the backward pass, when the banks, timesteps and tokens in use may have
        # changed (the next chunk's, or none). The state of the first call is kept, keyed by the context tensor the
        # block received (non-reentrant checkpointing, diffusers' default, passes the same tensor again); each forward
        # hands the block a new one. UNet blocks are not checkpointed whole: only their inner modules are.
        snapshots = WeakTensorKeyDictionary() if config.architecture != "unet" else None

        def inject(module, args, kwargs):
            context = _get_argument(args, kwargs, "encoder_hidden_states", context_index)
            if context is None:
                return None
            state = snapshots.get(context) if snapshots is not None else None
            if state is None:
                state = self._call_state(context.shape[0])
                if snapshots is not None and torch.is_grad_enabled():
                    snapshots[context] = state
            enabled, soft_tokens, banks, timesteps, length = state
            if not enabled:
                return None
            if config.architecture == "unet":
                tokens = self._call_tokens
                if tokens is None or tokens.shape[0] != context.shape[0]:  # a block called outside a denoiser call
                    tokens = soft_tokens(banks, timesteps)
                tokens = tokens.to(context.device, context.dtype)
                context = torch.cat([context[:, :1], tokens, context[:, 1:]], dim=1)
            elif config.architecture == "mmdit_rope":  # overwrite the reserved slots with this layer's tokens
                tokens = soft_tokens(banks, timesteps)[:, layer].to(context.device, context.dtype)
                n = config.n_tokens
                pieces = [context[:, :-n], tokens] if config.position == "append" else [tokens, context[:, n:]]
                context = torch.cat(pieces, dim=1)
            else:
                context = context[:, :length] if config.position == "append" else context[:, -length:]
                if layer < config.n_layers:
                    tokens = soft_tokens(banks, timesteps)[:, layer].to(context.device, context.dtype)
                    pieces = [context, tokens] if config.position == "append" else [tokens, context]
                    context = torch.cat(pieces, dim=1)
            return _set_argument(args, kwargs, "encoder_hidden_states", context_index, context)

        return inject

    def _call_state(self, batch: int) -> tuple:
        """What a block call injects: `(enabled, soft_tokens, banks, timesteps, text_len)` as they are now."""
        if not self.enabled:
            return (False, None, None, None, None)
        return (True, self.soft_tokens, *self._rows(batch), self._text_len)


def check_compatible(config, pipe_or_denoiser) -> None:
    """Raise a `ValueError` naming both shapes when soft tokens of `config` do not fit the denoiser."""
    denoiser = denoiser_of(pipe_or_denoiser)
    architecture = architecture_of(denoiser)
    dim = context_dim_of(denoiser)
    if architecture != config.architecture:
        raise ValueError(
            f"These soft tokens are for a {config.architecture} denoiser (family {config.family or 'unknown'}, "
            f"tokens {tuple(config.parameter_shapes()['tokens'])}), but the model is a {type(denoiser).__name__} "
            f"({architecture})."
        )
    if dim != config.dim:
        expected = config.parameter_shapes()["tokens"][:-1] + (dim,)
        raise ValueError(
            f"Soft tokens of shape {tuple(config.parameter_shapes()['tokens'])} do not fit this model: its context "
            f"width is {dim}, so the tokens would need shape {tuple(expected)}."
        )
    if architecture == "mmdit" and config.n_layers > len(denoiser.transformer_blocks):
        raise ValueError(
            f"Soft tokens for {config.n_layers} layers (shape {tuple(config.parameter_shapes()['tokens'])}) do not "
            f"fit a transformer with {len(denoiser.transformer_blocks)} blocks."
        )
    if architecture == "mmdit_rope" and config.n_layers > len(rope_blocks(denoiser, config.blocks)):
        raise ValueError(
            f"Soft tokens for {config.n_layers} layers (shape {tuple(config.parameter_shapes()['tokens'])}) do not "
            f"fit a transformer with {len(rope_blocks(denoiser, config.blocks))} blocks of kind {config.blocks!r}."
        )


def rope_blocks(transformer: nn.Module, kind: str) -> list[nn.Module]:
    """The blocks of a FLUX.1 transformer that count as soft-token layers 0, 1, ...: `"dual"` (double-stream),
    `"single"` (single-stream) or `"all"` (double-stream, then single-stream)."""
    dual, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    return {"dual": dual, "single": single, "all": dual + single}[kind]


def attach_soft_tokens(pipe_or_denoiser, soft_tokens: SoftTokens, default_bank: int = 0) -> SoftTokenInjection:
    """Attach `soft_tokens` to a pipeline's denoiser (or a denoiser) and return the injection handle.

    Args:
        pipe_or_denoiser: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`,
            `FluxPipeline`, or their `UNet2DConditionModel` / `SD3Transformer2DModel` / `FluxTransformer2DModel`.
        soft_tokens ([`SoftTokens`]): moved to the denoiser's device; kept in float32 (cast per call).
        default_bank (`int`, *optional*, defaults to 0): bank used when no `bank_ids` are set (psi+).
    """
    denoiser = denoiser_of(pipe_or_denoiser)
    device = next(denoiser.parameters()).device
    soft_tokens.to(device)
    return SoftTokenInjection(denoiser, soft_tokens, default_bank=default_bank).attach()


def injection_of(pipe_or_denoiser) -> SoftTokenInjection | None:
    """The soft-token injection attached to this pipeline's denoiser, if any."""
    return getattr(denoiser_of(pipe_or_denoiser), _ATTRIBUTE, None)
