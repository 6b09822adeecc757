"""The method registry: built-in adapters, lazily imported, plus third-party entry points.

Third-party packages register in the ``subjectbench.methods`` entry-point group
(``name = "package.module:Class"``); the class must subclass ``methods.base.Method``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from data.common import did_you_mean

ENTRY_POINT_GROUP = "subjectbench.methods"

# name -> "module:Class"; imported only when used, so listing methods loads no model code.
BUILTIN_METHODS: dict[str, str] = {
    "dummy": "methods.dummy:DummyMethod",
    "textual_inversion": "methods.textual_inversion:TextualInversion",
    "dreambooth": "methods.dreambooth:DreamBooth",
    "dreambooth_lora": "methods.dreambooth:DreamBoothLoRA",
    "hifi_tuner": "methods.hifi_tuner:HifiTuner",
    "dreamblend": "methods.dreamblend:DreamBlend",
    "custom_diffusion": "methods.custom_diffusion:CustomDiffusion",
    "two_stage": "methods.single_image:TwoStage",
    "ip_adapter": "methods.ip_adapter:IPAdapter",
    "tuning_encoder": "methods.tuning_encoder:TuningEncoder",
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _entry_point_methods() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_methods() -> dict[str, str]:
    """All registered names, built-in first, with their import targets."""
    found = dict(BUILTIN_METHODS)
    for name, target in _entry_point_methods().items():
        found.setdefault(name, target)
    return found


def get_method(name: str) -> type:
    """The adapter class registered under ``name``; unknown names list the valid ones."""
    from methods.base import Method

    registry = available_methods()
    if name not in registry:
        raise UnknownMethodError(
            f"unknown method {name!r}{did_you_mean(name, registry)}; valid: {', '.join(sorted(registry))}"
        )
    module_name, _, class_name = registry[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownMethodError(
            f"method {name!r} is registered as {registry[name]!r} but cannot be imported: {error}"
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UnknownMethodError(
            f"method {name!r}: {registry[name]!r} is not a subclass of methods.base.Method"
        )
    return cls
