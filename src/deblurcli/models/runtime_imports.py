"""Import only the parts of diffusers that running a model needs (issue 24: time to first image).

``import diffusers.models.unets.unet_2d_condition`` first runs the ``__init__`` of every package
on the way, and diffusers' ``models.autoencoders``, ``models.unets`` and ``models.transformers``
packages import *every* model of their kind (dozens of video, audio and DiT models). Some of
those, and ``diffusers.hooks``, import peft, and peft imports ``transformers``; the quantizer
back-ends import bitsandbytes when it is installed (the ``eval`` extra's pyiqa brings it). On a
2-core CPU that was about 6 s of a 15 s ``deblurcli deblur photo.png out/`` (docs/performance.md).

:func:`import_diffusers_for_inference` imports the few modules deblurcli's networks are built
from, with

* those three packages *deferred*: registered without running their ``__init__``, which runs,
  completely and in place, the first time anything asks the package for a name it does not have
  yet (so a later ``from diffusers.models.unets import UNet2DModel`` still works), and
* peft, transformers, bitsandbytes and scipy hidden while these modules import (an import of
  them fails, and diffusers' ``is_peft_available()``-style flags say they are absent), so that
  diffusers takes its paths without them. Afterwards they import normally again and the flags
  are restored; deblurcli's own LoRA code imports peft when it runs.

It changes the state of the diffusers import for the whole process, so only the ``deblurcli``
command calls it, and only for a run that needs no live LoRA adapters (fused weights). It does
nothing once diffusers is imported, and on any failure it takes its changes back and reports
``False``; the caller then imports normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

DEFERRED_PACKAGES = (
    "diffusers.models.autoencoders",
    "diffusers.models.unets",
    "diffusers.models.transformers",
)
#: The modules deblurcli's EVAE and UNet are built from.
RUNTIME_MODULES = (
    "diffusers.configuration_utils",
    "diffusers.models.modeling_utils",
    "diffusers.models.autoencoders.vae",
    "diffusers.models.unets.unet_2d_condition",
)
#: Packages hidden while the modules above import (``import`` fails, and diffusers'
#: ``diffusers.utils.import_utils`` flag says so): none of them is needed to run a fused model.
HIDDEN_PACKAGES = {
    "peft": "_peft_available",
    "transformers": "_transformers_available",
    "bitsandbytes": "_bitsandbytes_available",
    "scipy": "_scipy_available",
}
_INIT_ATTR = "_deblurcli_deferred_init"


class _DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` runs on the first look-up of a name it does not have."""

    def __getattr__(self, name: str):
        code = self.__dict__.pop(_INIT_ATTR, None)
        if code is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.__class__ = types.ModuleType
        exec(code, self.__dict__)  # the package's own __init__, in its own namespace
        return getattr(self, name)


class _Hide:
    """A ``sys.meta_path`` finder under which the packages named cannot be imported."""

    def __init__(self, names) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by deblurcli)",
                                      name=fullname)
        return None


def _defer(name: str) -> _DeferredPackage | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return None
    with open(spec.origin, "rb") as f:
        code = compile(f.read(), spec.origin, "exec")
    module = _DeferredPackage(name)
    module.__spec__ = spec
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = name
    module.__loader__ = spec.loader
    setattr(module, _INIT_ATTR, code)
    sys.modules[name] = module
    return module


def import_diffusers_for_inference() -> bool:
    """Import :data:`RUNTIME_MODULES` without the rest of diffusers, peft or bitsandbytes (see
    the module docstring). Returns whether it did: ``False`` when diffusers was already
    imported (nothing is done) or anything went wrong (the deferred packages are dropped and
    the hidden ones shown again, so that a normal import follows; the modules imported so far
    stay).

    (``torch._dynamo``, most of what is left of diffusers' import time, cannot be left out the
    same way: ``diffusers.hooks`` decorates classes with ``torch.compiler.disable`` as it
    imports.)
    """
    if any(name == "diffusers" or name.startswith("diffusers.") for name in sys.modules):
        return False
    deferred: list[str] = []
    saved: dict[str, object] = {}
    flags = hide = None
    try:
        flags = importlib.import_module("diffusers.utils.import_utils")
        for name in DEFERRED_PACKAGES:
            if name not in sys.modules and _defer(name) is not None:
                deferred.append(name)
        hidden = [pkg for pkg in HIDDEN_PACKAGES if pkg not in sys.modules]
        for pkg in hidden:
            flag = HIDDEN_PACKAGES[pkg]
            if isinstance(getattr(flags, flag, None), bool):
                saved[flag] = getattr(flags, flag)
                setattr(flags, flag, False)
        sys.meta_path.insert(0, hide := _Hide(hidden))
        for name in RUNTIME_MODULES:
            importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any surprise from another diffusers: import normally
        for name in deferred:
            if isinstance(sys.modules.get(name), _DeferredPackage) and \
                    _INIT_ATTR in sys.modules[name].__dict__:
                del sys.modules[name]
        return False
    finally:
        if hide is not None and hide in sys.meta_path:
            sys.meta_path.remove(hide)
        for flag, value in saved.items():
            setattr(flags, flag, value)
