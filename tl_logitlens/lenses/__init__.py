"""Lenses: how a stack entry's vectors are transformed before the final norm and unembedding.

- :mod:`.base`: the :class:`Lens` protocol (``transform(h, label) -> h``, and ``built_for()``:
  the :class:`ModelSignature` of the model a lens was made for), the identity :class:`LogitLens`,
  and what every entry point does with a ``lens=`` argument (:func:`check_lens`, one check for all)
- :mod:`.tuned`: :class:`TunedLens` (one affine translator per entry) and its file format,
  EleutherAI tuned-lens 0.2.0's
- :mod:`.jacobian`: :class:`JacobianLens` (one fitted linear map per entry) and its file format,
  TransformerLens 4.3's
- :mod:`.training`: :func:`train_tuned_lens`, :func:`fit_jacobian_lens`
- :mod:`.generation`: decoding from a stack entry (:meth:`Lens.generate` for every lens, and the
  loop :func:`tl_logitlens.patchscope_generate` shares)

A new lens is a module here that implements ``transform(h, label)`` (and its own fit, ``save``
and ``load`` if it is trained); every analysis, figure and the command line take it as ``lens=``
without change.

Example::

    >>> import torch
    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> lens = tll.TunedLens(model)
    >>> h = torch.randn(3, model.cfg.d_model)
    >>> bool(torch.equal(lens.transform(h, "0_pre"), tll.LogitLens().transform(h, "0_pre")))
    True
"""

from __future__ import annotations

from ..model_access import stream_change, unembed_hash
from .base import Lens, LogitLens, ModelSignature, apply_lens, check_lens, is_identity, lens_name, reads_final_untouched
from .jacobian import JacobianLens
from .training import fit_jacobian_lens, train_tuned_lens
from .tuned import TunedLens

__all__ = [
    "JacobianLens",
    "Lens",
    "LogitLens",
    "ModelSignature",
    "TunedLens",
    "apply_lens",
    "check_lens",
    "fit_jacobian_lens",
    "is_identity",
    "lens_name",
    "reads_final_untouched",
    "stream_change",
    "train_tuned_lens",
    "unembed_hash",
]
