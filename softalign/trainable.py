"""The parameters a SoftAlign (or RL) stage trains: soft tokens and/or LoRA adapters, with their EMA copies.

AGSM has two parameter sets, psi+ for matched pairs and psi- for mismatched ones. For soft tokens these are the two
banks of one [`SoftTokens`]; for LoRA they are two PEFT adapters on the denoiser, `softalign_pos` and
`softalign_neg`. A forward over a pair grid routes each row by its bank: with LoRA the rows are split into the
positive and the negative group, each run with its own adapter active, and the outputs are put back in row order, so
each adapter receives gradient only from its own pairs. The EMA copies (`softalign_pos_ema`, `softalign_neg_ema`
and a copy of the tokens) are used for AGSM's rewards and never trained.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .atomic import atomic_directory
from .families import base_model_record, denoiser_of
from .injection import SoftTokenInjection, attach_soft_tokens, injection_of
from .loaders import save_soft_tokens
from .soft_tokens import SoftTokens

POS, NEG = "softalign_pos", "softalign_neg"
SINGLE = "softalign"


class TrainedParameters:
    """Soft tokens (attached to the denoiser) and/or LoRA adapters, plus EMA copies when `ema=True`.

    [`route`] runs a pair grid with each row through its bank's parameters; [`reference`] gives the reference model of
    preference losses; `state_dict()` holds every trained and EMA tensor for checkpoints.
    """

    def __init__(
        self, pipe, soft_tokens: SoftTokens | None, peft_config=None, two_banks: bool = True, ema: bool = True
    ):
        self.denoiser = denoiser_of(pipe)
        self.base_model = base_model_record(pipe)
        self.soft_tokens = soft_tokens
        self.injection: SoftTokenInjection | None = None
        if soft_tokens is not None:
            existing = injection_of(pipe)
            if existing is not None and existing.soft_tokens is not soft_tokens:
                raise ValueError("The pipeline carries other soft tokens; unload them or pass those tokens.")
            self.injection = existing or attach_soft_tokens(pipe, soft_tokens)
            soft_tokens.requires_grad_(True)
        self.ema_tokens = None
        if soft_tokens is not None and ema:
            self.ema_tokens = copy.deepcopy(soft_tokens).requires_grad_(False)  # starts as the initial tokens
        self.adapters: list[str] = []
        self.ema_adapters: dict[str, str] = {}
        if peft_config is not None:
            self.adapters = [POS, NEG] if two_banks else [SINGLE]
            for name in self.adapters:
                self.denoiser.add_adapter(copy.deepcopy(peft_config), adapter_name=name)
            if ema:
                for name in self.adapters:
                    self.ema_adapters[name] = f"{name}_ema"
                    self.denoiser.add_adapter(copy.deepcopy(peft_config), adapter_name=f"{name}_ema")
                    with torch.no_grad():
                        for target, source in zip(
                            self.lora_parameters(f"{name}_ema"), self.lora_parameters(name), strict=True
                        ):
                            target.copy_(source)
            self._activate(self.adapters[0])
        if soft_tokens is None and peft_config is None:
            raise ValueError("Nothing to train: pass soft_tokens and/or peft_config.")

    # -- parameters ---------------------------------------------------------------------------------------------
    def lora_parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        """The LoRA parameters of the PEFT adapter `adapter` on the denoiser."""
        marker = f".{adapter}."
        return [p for n, p in self.denoiser.named_parameters() if marker in n and "lora_" in n]

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trained parameter (soft tokens, then each trained LoRA adapter); never the EMA copies."""
        params = list(self.soft_tokens.parameters()) if self.soft_tokens is not None else []
        for name in self.adapters:
            params += self.lora_parameters(name)
        return params

    def _activate(self, adapter: str) -> None:
        self.denoiser.set_adapter(adapter)
        # PEFT's set_adapter freezes inactive adapters; the trained ones must keep requires_grad for the next forward.
        for name in self.adapters:
            for p in self.lora_parameters(name):
                p.requires_grad_(True)
        for name in self.ema_adapters.values():
            for p in self.lora_parameters(name):
                p.requires_grad_(False)

    def save(self, target) -> Path:
        """Write the trained parameters: the soft tokens to `target` (the adapter format, with the base model they
        were trained on) and each LoRA adapter to `<target's parent>/lora/<name>/` (diffusers' `save_lora_adapter`
        layout, loaded back by [`load_lora`])."""
        target = Path(target)
        if self.soft_tokens is not None:
            save_soft_tokens(self.soft_tokens, target, base_model=self.base_model)
        for name in self.adapters:
            with atomic_directory(target.parent / "lora" / name) as staging:
                self.denoiser.save_lora_adapter(str(staging), adapter_name=name)
        return target

    # -- forward over a pair grid -------------------------------------------------------------------------------
    def forward(self, predict, banks: torch.Tensor, ema: bool = False):
        """Deprecated alias of [`route`] (removed in the next release)."""
        warnings.warn("TrainedParameters.forward is deprecated; use route().", DeprecationWarning, stacklevel=2)
        return self.route(predict, banks, ema=ema)

    def route(self, predict, banks: torch.Tensor, ema: bool = False):
        """`predict(rows)` for every row, each row through its bank (0: psi+, 1: psi-), online or EMA parameters.

        Args:
            predict (`callable`): `predict(index) -> prediction` for the rows `index` (a LongTensor).
            banks (`torch.LongTensor` of shape `(rows,)`).
        """
        with self._tokens(ema):
            if not self.adapters:
                with self.injection.use_banks(banks):
                    return predict(torch.arange(banks.shape[0], device=banks.device))
            groups = [(b, (banks == b).nonzero()[:, 0]) for b in banks.unique().tolist()]
            outputs, order = [], []
            for bank, index in groups:
                name = self.adapters[min(bank, len(self.adapters) - 1)]
                self._activate(self.ema_adapters[name] if ema else name)
                with self._banks(banks[index]):
                    outputs.append(predict(index))
                order.append(index)
            self._activate(self.adapters[0])
            output = torch.cat(outputs)
            return output[torch.argsort(torch.cat(order))]

    @contextmanager
    def _tokens(self, ema: bool):
        if self.injection is not None and ema and self.ema_tokens is not None:
            with self.injection.swapped(self.ema_tokens):
                yield
        else:
            yield

    @contextmanager
    def _banks(self, banks):
        if self.injection is None:
            yield
        else:
            with self.injection.use_banks(banks):
                yield

    @contextmanager
    def reference(self, tokens: SoftTokens | None = None):
        """The reference model of preference losses: LoRA adapters disabled and the soft tokens replaced by `tokens`
        (a frozen snapshot), or detached when `tokens` is None. No second copy of the denoiser is made."""
        if self.adapters:
            self.denoiser.disable_adapters()
        try:
            if self.injection is None:
                yield
            elif tokens is not None:
                with self.injection.swapped(tokens):
                    yield
            else:
                with self.injection.disabled():
                    yield
        finally:
            if self.adapters:
                self.denoiser.enable_adapters()
                self._activate(self.adapters[0])

    # -- EMA ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """Move every EMA copy towards its trained parameters: `ema = decay * ema + (1 - decay) * param`."""
        pairs = []
        if self.ema_tokens is not None:
            pairs += list(zip(self.ema_tokens.parameters(), self.soft_tokens.parameters(), strict=True))
        for name, ema_name in self.ema_adapters.items():
            pairs += list(zip(self.lora_parameters(ema_name), self.lora_parameters(name), strict=True))
        for ema_param, param in pairs:
            ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - decay)

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained and EMA tensor, float32, under stable names (for checkpoints)."""
        state = {}
        if self.soft_tokens is not None:
            state.update({f"soft_tokens.{k}": v for k, v in self.soft_tokens.state_dict().items()})
        if self.ema_tokens is not None:
            state.update({f"ema_tokens.{k}": v for k, v in self.ema_tokens.state_dict().items()})
        for name in self.adapters + list(self.ema_adapters.values()):
            marker = f".{name}."
            for key, value in self.denoiser.state_dict().items():
                if marker in key and "lora_" in key:
                    state[f"lora.{key}"] = value
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what [`state_dict`] returned; the tensor names must match this run's exactly."""
        expected = self.state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"Checkpoint tensors do not match this run (missing {missing[:5]}, unexpected {extra[:5]})."
            )
        if self.soft_tokens is not None:
            self.soft_tokens.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("soft_tokens.")})
        if self.ema_tokens is not None:
            self.ema_tokens.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("ema_tokens.")})
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        if lora:
            params = dict(self.denoiser.named_parameters())
            for key, value in lora.items():
                params[key].copy_(value.to(params[key].dtype))


class TrainableState(TrainedParameters):
    """Deprecated name of [`TrainedParameters`] (removed in the next release)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("TrainableState is deprecated; use TrainedParameters.", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
