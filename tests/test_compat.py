"""translator/compat.py: an aiocoap without an internal API the gateway relies on is refused at
start, loudly, naming what is missing and why it is needed.

Each requirement is taken away in turn from the installed aiocoap (a class attribute deleted,
or an ``__init__`` that no longer assigns the instance attribute), and the check, and the
start of a real CoAP side, must fail with that name.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from aiocoap import defaults as coap_defaults

from translator import compat
from translator.coap.side import CoapSide
from translator.compat import DTLS_REQUIREMENTS, OSCORE_REQUIREMENTS, REQUIREMENTS, CompatError

from .test_coap_supervision import Recorder

INSTALLED = list(REQUIREMENTS)
if not coap_defaults.dtls_missing_modules():
    INSTALLED += DTLS_REQUIREMENTS
if not coap_defaults.oscore_missing_modules():
    INSTALLED += OSCORE_REQUIREMENTS


def test_the_installed_aiocoap_has_everything() -> None:
    compat.check_aiocoap()


def take_away(monkeypatch: pytest.MonkeyPatch, module: str, cls_name: str, name: str) -> None:
    cls: Any = getattr(importlib.import_module(module), cls_name)
    owners = [c for c in cls.__mro__ if name in c.__dict__]
    for owner in owners:
        monkeypatch.delattr(owner, name)
    if not owners:
        # An instance attribute: an __init__ that assigns every other name it did, not it.
        others = [n for n in cls.__dict__["__init__"].__code__.co_names if n != name]
        source = "def __init__(self, *args, **kwargs):\n" + "".join(
            f"    self.{other} = None\n" for other in others) + "    pass\n"
        namespace: dict[str, Any] = {}
        exec(source, namespace)
        monkeypatch.setattr(cls, "__init__", namespace["__init__"])
    assert not compat._has(cls, name)


@pytest.mark.parametrize(("module", "cls_name", "name", "why"), INSTALLED,
                         ids=[f"{r[1]}.{r[2]}" for r in INSTALLED])
def test_a_missing_internal_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, module: str, cls_name: str, name: str, why: str
) -> None:
    take_away(monkeypatch, module, cls_name, name)
    with pytest.raises(CompatError) as refused:
        compat.check_aiocoap()
    assert f"{cls_name} has no {name!r}" in str(refused.value)
    assert why in str(refused.value) and "aiocoap 0.4" in str(refused.value)


async def test_the_coap_side_does_not_start_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "aiocoap.protocol", "BlockwiseRequest",
              "_complete_by_requesting_block2")
    side = CoapSide(Recorder())
    with pytest.raises(CompatError, match="_complete_by_requesting_block2"):
        await side.start()
    await side.shutdown()


def test_a_missing_class_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiocoap.protocol

    monkeypatch.delattr(aiocoap.protocol, "BlockwiseRequest")
    with pytest.raises(CompatError, match=r"has no aiocoap\.protocol\.BlockwiseRequest"):
        compat.check_aiocoap()


@pytest.mark.parametrize(("module", "cls_name", "name", "why"), compat.WEBSOCKETS_REQUIREMENTS,
                         ids=[r[2] for r in compat.WEBSOCKETS_REQUIREMENTS])
def test_a_websockets_without_an_internal_the_web_side_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch, module: str, cls_name: str, name: str, why: str
) -> None:
    compat.check_websockets()
    take_away(monkeypatch, module, cls_name, name)
    with pytest.raises(CompatError) as refused:
        compat.check_websockets()
    assert f"{cls_name} has no {name!r}" in str(refused.value) and why in str(refused.value)
