"""The fused decode plans' cache (:mod:`ssmkit.models.fused_decode`): when a cached plan still holds."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from ..ops.mamba_step import WeightsKey

# Parameters, buffers and submodules are (re)registered on a module only when a model is built or changed (a new
# layer, load_state_dict(assign=True), ...). Counting registrations lets a decode step check its cached plan in
# microseconds instead of walking every block (about 1 ms per token for 24 blocks, 4% of a step). torch offers
# such hooks only process-wide, so they are installed only while some model holds a fused plan and removed when
# the last such model is gone: importing this module, or using ssmkit without fused decoding, changes nothing.
_REGISTRATIONS = [0]
_HOOKS: list = []  # the handles of the installed hooks
_HOLDERS = [0]  # live owners of a cached plan


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    _REGISTRATIONS[0] += 1


def _hold(owner: object) -> None:
    """Install the registration hooks (if not yet) for as long as ``owner`` lives."""
    if not _HOOKS:
        _HOOKS.extend(register(_count_registration) for register in (
            nn.modules.module.register_module_parameter_registration_hook,
            nn.modules.module.register_module_buffer_registration_hook,
            nn.modules.module.register_module_module_registration_hook))
        _REGISTRATIONS[0] += 1  # registrations made while no hook counted them: no older plan may be trusted
    _HOLDERS[0] += 1
    weakref.finalize(owner, _release)


def _release() -> None:
    _HOLDERS[0] -= 1
    if _HOLDERS[0] == 0:
        for handle in _HOOKS:
            handle.remove()
        _HOOKS.clear()


@dataclass
class _Cached:
    registrations: int
    settings: tuple  # per block (training, norm eps, mixer settings), the final norm eps: no hooks see them
    key: WeightsKey  # a `.data` swap, a dtype/device move or an in-place update of a copied weight breaks it
    tensors: list[Tensor]
    plan: object  # a MambaStackPlan, Mamba2StackPlan or Mamba3StackPlan, None (not eligible), or a hybrid's runs
    quantized: tuple = ()  # the quantized linear layers: their act_quant settings, read when the plan was built
    acts: tuple = ()


def _fresh(cached: _Cached | None, settings: tuple) -> bool:
    """Whether a cached plan still holds: no registration, same settings, same weights, same act_quant."""
    return (cached is not None and cached.registrations == _REGISTRATIONS[0] and cached.settings == settings
            and cached.key.matches(cached.tensors) and tuple(m.act_quant for m in cached.quantized) == cached.acts)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
