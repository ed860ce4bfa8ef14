"""The lens interface, and what every entry point does with a ``lens=`` argument.

A lens is a small interface, ``transform(h, label) -> h`` for vectors ``h [..., d_model]``
at a stack entry named by its TransformerLens label (``"0_pre"``, ``"3_mid"``,
``"final_post"``). :class:`LogitLens` is the identity (the plain logit lens). Any callable
``(h, label) -> h`` is accepted wherever ``lens=`` is.

A lens made for one model says so through ``built_for()``, which returns a
:class:`ModelSignature` (layers, width, the unembedding's identity, the entries it reads);
a lens that fits any model (the logit lens, a plain function) has none. :func:`check_lens`
is the one check every entry point runs on ``lens=`` before any forward pass: it refuses a
class, a callable that cannot be called as ``lens(vectors, label)``, and a lens built for
another model. :func:`apply_lens` applies one and checks what it returns.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import LensInputError, NonFiniteActivationError
from ..inputs import resolve_model, tokenize
from ..kernel import compute_dtype
from ..model_access import ModelView, compute_device, input_device, run_patched, unembed_matches
from .generation import check_generation, check_room, decode_loop, decode_text, one_entry


@dataclass(frozen=True)
class ModelSignature:
    """What a lens was built for, as :func:`check_lens` compares it with a model.

    Attributes:
        n_layers, d_model: the model's sizes.
        unembed: the identity of its unembedding: an
            :func:`~tl_logitlens.model_access.unembed_sample` (or tuned-lens's
            :func:`~tl_logitlens.model_access.unembed_hash`), compared with
            :func:`~tl_logitlens.model_access.unembed_matches` so that the same weights in
            another dtype or on another device match; ``None``: not recorded.
        labels: the stack entries the lens reads (``None``: any).
        model_name: for messages.

    Example::

        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> tll.TunedLens(model).built_for().labels
        ('0_pre', '1_pre', 'final_post')
    """

    n_layers: int
    d_model: int
    unembed: Union[None, str, Sequence[float]] = None
    labels: Optional[Tuple[str, ...]] = None
    model_name: str = ""


class Lens:
    """The lens interface: ``transform(h, label) -> h`` at one stack entry.

    ``h`` is ``[..., d_model]``; ``label`` is the entry's TransformerLens label such as
    ``"3_pre"``, ``"3_mid"`` or ``"final_post"``; the result has ``h``'s shape. ``name``
    labels results and figures. Subclass it, or pass any callable ``(h, label)``.

    Example::

        >>> import torch
        >>> class Doubling(Lens):
        ...     name = "double"
        ...     def transform(self, h, label):
        ...         return 2 * h
        >>> Doubling()(torch.ones(2), "0_pre").tolist()
        [2.0, 2.0]
    """

    name: str = "lens"
    #: True when ``transform`` returns ``final_post`` untouched: the final entry is then the
    #: model's own distribution, read once and shared as every lens's KL reference. It is
    #: trusted only on the class that defines ``transform`` (a subclass that overrides
    #: ``transform`` must declare it again).
    identity_at_final: bool = False

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        raise NotImplementedError

    def built_for(self) -> Optional[ModelSignature]:
        """The model this lens was built for (``None``: it fits any model). A lens with parameters
        sized for one model (a tuned lens, a Jacobian lens) returns its :class:`ModelSignature`."""
        return None

    def __call__(self, h: torch.Tensor, label: str) -> torch.Tensor:
        return self.transform(h, label)

    def generate(
        self,
        model: Any,
        prompt: Any,
        *,
        layer: Union[int, str],
        max_new_tokens: int = 20,
        do_sample: bool = False,
        seed: int = 0,
    ) -> Union[str, List[str]]:
        """Decode from one layer through this lens: each new token is chosen from the lens's reading
        of the stream at ``layer`` (its transform, the final norm, the unembedding), the way
        tuned-lens's ``TunedLens.generate`` does.

        From ``"final_post"`` through the logit lens this is the model's own greedy continuation;
        from an earlier entry it shows what that layer, read by this lens, would say next.

        Args:
            model: the model the lens reads (in eval mode).
            prompt: a string, a list of strings (right-padded; each continues from its own end),
                or token ids ``[pos]`` or ``[batch, pos]``.
            layer: the stack entry read, by index into ``0_pre .. final_post`` (negative from the
                end) or by label (``"3_pre"``, ``"3_mid"``, ``"final_post"``).
            max_new_tokens: the most tokens added; a row stops earlier at the tokenizer's
                end-of-text token, which is left out of the text.
            do_sample: ``False``: the reading's top token (greedy); ``True``: a draw from its
                probabilities with a generator seeded by ``seed``.

        Returns:
            The continuation (new text only) for one prompt, a list of them for several.

        Example::

            >>> import tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> prompt = "red cat sun moon red cat"
            >>> own = model.generate(prompt, max_new_tokens=3, do_sample=False, use_past_kv_cache=False, verbose=False)
            >>> ours = tll.LogitLens().generate(model, prompt, layer="final_post", max_new_tokens=3)
            >>> ours, own == f"{prompt} {ours}"
            ('sun moon red', True)
        """
        return _generate_through_lens(
            self, model, prompt, layer=layer, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed
        )


class LogitLens(Lens):
    """The identity: every entry read as it is (the logit lens of nostalgebraist, 2020).

    Passing it is exactly the same as passing no lens.

    Example::

        >>> import torch
        >>> h = torch.randn(3, 4)
        >>> bool(torch.equal(LogitLens().transform(h, "1_pre"), h))
        True
    """

    name = "logit"
    identity_at_final = True

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        return h


def lens_name(lens: Any) -> str:
    """The name results record for ``lens``: ``"logit"`` for none, its ``name`` if it has one."""
    if lens is None:
        return "logit"
    name = getattr(lens, "name", None)
    if isinstance(name, str) and name:
        return name
    return "custom"


_WHAT_A_LENS_IS = (
    "a lens is a tl_logitlens.Lens (e.g. a TunedLens from tll.TunedLens.load(folder, model) or "
    "tll.train_tuned_lens(model, data)) or a callable lens(vectors [..., d_model], label) -> vectors; "
    "None reads the plain logit lens"
)


def check_lens(lens: Any, view: Optional[ModelView] = None, labels: Optional[Sequence[str]] = None) -> None:
    """The one check of a ``lens=`` argument, before any forward pass.

    Refused, with one message naming what a lens must be: a class (``lens=TunedLens`` rather
    than a lens object); anything not callable; a callable that cannot be called as
    ``lens(vectors, label)`` (such as a ``torch.nn.Linear``); a :class:`Lens` subclass without
    ``transform``. With ``view``, a lens whose ``built_for()`` names another model is refused
    naming both (layers, width, unembedding); with ``labels``, one that cannot read those
    entries.

    Example::

        >>> import torch, tl_logitlens as tll
        >>> check_lens(torch.nn.Linear(4, 4))
        Traceback (most recent call last):
        ...
        tl_logitlens.errors.LensInputError: lens=Linear(...) cannot be called as lens(vectors, label): ...
    """
    if lens is None:
        return
    if isinstance(lens, type):
        raise LensInputError(f"lens={lens.__name__} is a class, not a lens object: pass an instance; {_WHAT_A_LENS_IS}")
    if not callable(lens):
        raise LensInputError(
            f"lens must be a callable (vectors, label) -> vectors, such as a tl_logitlens.Lens; got "
            f"{type(lens).__name__}; {_WHAT_A_LENS_IS}"
        )
    _check_call_shape(lens)
    built_for = getattr(lens, "built_for", None)
    signature = built_for() if callable(built_for) else None
    if signature is not None and view is not None:
        _check_signature(signature, view, labels, type(lens).__name__)


def _check_call_shape(lens: Any) -> None:
    """Refuse a callable whose signature cannot take ``(vectors, label)``."""
    if isinstance(lens, Lens) and type(lens).transform is Lens.transform:
        raise LensInputError(f"lens: {type(lens).__name__} subclasses Lens without a transform(h, label) method")
    target = getattr(lens, "transform", None)
    if not callable(target):
        target = lens.forward if isinstance(lens, torch.nn.Module) else lens
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: its call will tell
        return
    try:
        signature.bind(None, None)
    except TypeError:
        shown = type(lens).__name__ + ("(...)" if isinstance(lens, torch.nn.Module) else "")
        raise LensInputError(
            f"lens={shown} cannot be called as lens(vectors, label): it takes {signature}; {_WHAT_A_LENS_IS}. "
            "Wrap a module that maps vectors to vectors: lens=lambda h, label: module(h)"
        ) from None


def _check_signature(signature: ModelSignature, view: ModelView, labels: Optional[Sequence[str]], kind: str) -> None:
    """Refuse a lens (a ``kind``) built for another model, or one that cannot read ``labels``."""
    other = "another model" + (
        f" ({signature.model_name!r})" if signature.model_name and signature.model_name != view.model_name else ""
    )
    if (signature.d_model, signature.n_layers) != (view.d_model, view.n_layers):
        raise LensInputError(
            f"lens is a {kind} for {other}: it has d_model={signature.d_model} and n_layers={signature.n_layers}, "
            f"the model has d_model={view.d_model} and n_layers={view.n_layers}; load or train a lens for this model"
        )
    if signature.unembed is not None and not unembed_matches(view.model, signature.unembed):
        raise LensInputError(
            f"lens is a {kind} for {other}: its unembedding differs from this model's (same sizes, other weights: "
            "another model, or this one with W_U processed, e.g. folded or centred), so its readings would be "
            "meaningless. "
            "Pass the model the lens was trained on; if the unembedding changed on purpose, save the lens and load "
            "it for this model with TunedLens.load(folder, model), which warns instead"
        )
    if labels is not None and signature.labels is not None:
        missing = [label for label in labels if label not in signature.labels]
        if missing:
            hint = (
                " (build or train the lens with incl_mid=True for _mid entries)"
                if any(m.endswith("_mid") for m in missing)
                else ""
            )
            more = f" (nor {missing[1:]})" if len(missing) > 1 else ""
            raise LensInputError(
                f"lens has no translator for stack entry {missing[0]!r}{more}{hint}; it reads {list(signature.labels)}"
            )


def is_identity(lens: Any) -> bool:
    """Whether ``lens`` reads the stream untouched (``None`` or a :class:`LogitLens`)."""
    return lens is None or type(lens) is LogitLens


def apply_lens(lens: Callable, vectors: torch.Tensor, label: str) -> torch.Tensor:
    """``lens(vectors, label)``, refused unless it is a finite tensor shaped like ``vectors``."""
    out = lens(vectors, label)
    if not isinstance(out, torch.Tensor) or out.shape != vectors.shape:
        raise LensInputError(
            f"lens must return a tensor shaped like its input {tuple(vectors.shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)} for stack entry {label!r}"
        )
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteActivationError(
            f"the lens returned {bad} NaN or inf values for stack entry {label!r} (its input was "
            f"{'finite' if bool(torch.isfinite(vectors).all()) else 'not finite either'}); a lens must "
            "map finite vectors to finite vectors. Check the lens's parameters."
        )
    return out


def reads_final_untouched(lens: Any) -> bool:
    """Whether ``lens`` reads ``final_post`` as the stream itself (``None``, or a lens whose class
    that defines ``transform`` declares ``identity_at_final``): its final entry is then the
    reference every KL is measured against. A subclass that overrides ``transform`` without
    declaring it again is read like any other callable."""
    if lens is None:
        return True
    owner = next((k for k in type(lens).__mro__ if "transform" in vars(k)), None)
    return owner is not None and bool(vars(owner).get("identity_at_final", False))


def _generate_through_lens(
    lens: Any,
    model: Any,
    prompt: Any,
    *,
    layer: Union[int, str],
    max_new_tokens: int,
    do_sample: bool,
    seed: int,
) -> Union[str, List[str]]:
    """:meth:`Lens.generate <tl_logitlens.lenses.Lens.generate>`: decode through ``lens`` at ``layer``."""
    view = resolve_model(model)
    label, hook = one_entry(view, layer)
    check_lens(lens, view, [label])  # a lens for another model, or one that cannot read `label`: refused now
    check_generation(max_new_tokens, do_sample, seed)
    tokens = tokenize(view, prompt)
    check_room(view, tokens, max_new_tokens)
    dtype, device = compute_dtype(view.W_U.dtype), compute_device(view)
    plain = is_identity(lens)

    def step(ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        stream = run_patched(view.model, ids.to(input_device(view)), [], hook, last)
        stream = stream.to(device=device, dtype=dtype)
        return stream if plain else apply_lens(lens, stream, label)

    new = decode_loop(view, tokens, step, max_new_tokens=int(max_new_tokens), do_sample=do_sample, seed=seed)
    texts = [decode_text(view, ids) for ids in new]
    return texts[0] if _one_prompt(prompt) else texts


def _one_prompt(prompt: Any) -> bool:
    """Whether ``prompt`` is one prompt (a string or 1-D ids), answered with one string."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        return prompt.ndim == 1
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], (str, list, tuple))
