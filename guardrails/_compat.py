"""The transformers names that moved between releases: one place for all of ``guardrails``.

They are defined once, in ``steering._compat`` (steering is the lower layer and is used on its own);
this module re-exports them and adds the ones only ``guardrails`` uses, so no other module of
``guardrails`` spells a version-sensitive name.
"""

from typing import Any

from steering import _compat as _steering_compat
from steering._compat import *  # noqa: F403  (re-exported: the names listed in its __all__)

__all__ = [*_steering_compat.__all__, "pil_image_processor"]


def pil_image_processor(model: str) -> Any:
    """The PIL/NumPy image processor class of ``model`` (e.g. "Llava"), which needs no torchvision.

    It is ``<Model>ImageProcessorPil`` in recent releases; in early 5.x that class was
    ``<Model>ImageProcessor`` (the torchvision one was ``...Fast``).
    """
    import transformers

    cls = getattr(transformers, f"{model}ImageProcessorPil", None)
    return cls if cls is not None else getattr(transformers, f"{model}ImageProcessor")
