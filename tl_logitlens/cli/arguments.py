"""Command-line arguments read and checked before any model is loaded (no torch needed), and
the model, prompts and data they name."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import LensInputError
from ..files import HTML_MARK, JS_MARK, OwnedFolder, check_file, check_folder
from .output import silence_loaded_libraries

METRICS = ("prob", "logit", "rank", "entropy", "kl", "loss")
DTYPES = ("float32", "float64", "bfloat16", "float16")
FORMATS = ("png", "pdf", "svg")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "demo" / "demo_config.json"
#: The training checkpoint's file name (tl_logitlens.lenses.training.CHECKPOINT, which imports torch).
CHECKPOINT = "checkpoint.pt"
#: Where ``--plotly`` takes plotly.js from (tl_logitlens.plots.interactive.PLOTLY_MODES, which imports torch).
PLOTLY_MODES = ("directory", "inline", "cdn")
#: The plotly.js a ``--plotly directory`` page loads from its folder (tl_logitlens.plots.interactive.PLOTLY_FILE).
_PLOTLY_FILE = "plotly.min.js"
#: Resolution limits of --dpi: print quality is 300; beyond 1200 a page-wide figure needs gigabytes.
DPI_RANGE = (10.0, 1200.0)
#: The most any count option takes (a trillion tokens): larger values overflow torch's int64 arithmetic.
_MOST = 2**40
#: Positive integer options, checked before any import; the ones a command lacks are skipped.
_COUNTS = ("top_k", "max_tokens", "batch_size", "steps", "tokens_per_step", "checkpoint_every")
_OVERWRITE = "pass --overwrite"


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


# -- argument checks that need no model (and no torch) ------------------------------------
def parse_token(spec: Optional[str], option: str) -> Union[None, int, str]:
    """``id:N`` -> the int ``N``; anything else stays text (the token's text or vocabulary piece)."""
    if spec is None:
        return None
    if spec.startswith("id:"):
        digits = spec[3:].strip()
        if not digits.isdigit():
            raise UsageError(f"{option} {spec!r}: after 'id:' give a token id (a non-negative integer), e.g. id:317")
        return int(digits)
    if spec == "":
        raise UsageError(f"{option} is empty; give a token's text, its vocabulary piece, or id:N")
    return spec


def parse_tokens(values: Sequence[str]) -> List[List[int]]:
    """``--tokens`` values as prompts of ids: ids split by commas or spaces, prompts by ``;``.

    An empty entry (``1,,5``, a trailing comma) is refused, as ``--layers`` refuses one.
    """
    prompts = []
    for value in values:
        for part in value.split(";"):
            if not part.strip():
                raise UsageError(
                    f"--tokens {value!r} holds an empty prompt; give ids like 49,12,7,50 (prompts split by ';')"
                )
            entries = [entry.strip() for entry in part.split(",")]
            if not all(entries):
                raise UsageError(f"--tokens {value!r} has an empty entry; give ids like 49,12,7,50 (no ',,')")
            pieces = [p for entry in entries for p in entry.split()]
            bad = [p for p in pieces if not p.isdigit()]
            if bad:
                raise UsageError(
                    f"--tokens {value!r}: {bad[0]!r} is not a token id; give non-negative integers like 49,12,7,50"
                )
            huge = [p for p in pieces if int(p) > _MOST]
            if huge:
                raise UsageError(f"--tokens {value!r}: {huge[0]} is too large to be a token id of any vocabulary")
            prompts.append([int(p) for p in pieces])
    return prompts


def parse_layers(spec: Optional[str]) -> Optional[List[Union[int, str]]]:
    """``--layers 0,2,-1,final_post``: stack entries by index (negative counts from the end) or label."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")]
    if not all(items):
        raise UsageError(f"--layers {spec!r} has an empty entry; give indices or labels like 0,2,final_post")
    bad = [s for s in items if not re.fullmatch(r"-?\d+|\d+_(pre|mid)|final_post", s)]
    if bad:
        raise UsageError(
            f"--layers {spec!r}: {bad[0]!r} is neither an index nor a stack entry label; give indices "
            "(negative from the end) or labels such as 0_pre, 3_mid, final_post"
        )
    return [int(s) if re.fullmatch(r"-?\d+", s) else s for s in items]


def _read_text(path: str, what: str, option: str) -> str:
    file = Path(path)
    if not file.is_file():
        kind = (
            "is a folder, not a file"
            if file.is_dir()
            else ("is not a regular file" if file.exists() else "does not exist")
        )
        raise UsageError(f"{option}: {path!r} {kind}; pass {what}")
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise UsageError(f"{option}: {path!r} looks binary (it holds NUL bytes); pass {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{option}: {path!r} is not UTF-8 text (byte {err.start}); pass {what}") from None


def prompt_spec(args: argparse.Namespace) -> Dict[str, Any]:
    """The prompts as given: ``{"text": [str, ...]}`` or ``{"tokens": [[int, ...], ...]}``."""
    if args.tokens:
        prompts = parse_tokens(args.tokens)
        lengths = sorted({len(p) for p in prompts})
        if len(lengths) > 1:
            raise UsageError(
                f"the --tokens prompts have different lengths {lengths}; token prompts are read as one "
                "[batch, pos] tensor, all of it real tokens, so give prompts of equal length (or run them separately)"
            )
        return {"tokens": prompts}
    if args.prompts is not None:
        text = _read_text(args.prompts, "a UTF-8 text file with one prompt per line", "--prompts")
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts: {args.prompts!r} holds no prompt (every line is empty)")
        return {"text": prompts}
    for prompt in args.prompt:
        if not prompt.strip():
            raise UsageError("--prompt is empty; give the text to read")
    return {"text": list(args.prompt)}


def check_out(out: Optional[str], overwrite: bool = False) -> Optional[Path]:
    """The output folder, refused before any work if it names an existing file, cannot be written, or
    holds files tl-logitlens did not write there (unless ``--overwrite``; see :mod:`tl_logitlens.files`)."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is an existing file, not a folder; name a folder (it is created if missing)")
    try:
        return check_folder(path, overwrite=overwrite, what="--out", mend=_OVERWRITE)
    except LensInputError as err:
        raise UsageError(str(err)) from None


def make_out(path: Optional[Path], overwrite: bool = False) -> Optional[OwnedFolder]:
    """The output folder claimed for writing (created at its first file), or ``None`` without ``--out``."""
    if path is None:
        return None
    try:
        return OwnedFolder(path, overwrite=overwrite, what="--out", mend=_OVERWRITE)
    except LensInputError as err:
        raise UsageError(str(err)) from None


def _check_device_syntax(spec: str) -> None:
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N or mps")


def _check_model_spec(spec: str) -> None:
    """``demo``, a folder, or a hub name that can be had: in the Hugging Face cache, or with the hub reachable.

    A name that is neither a folder nor cached is refused at once when the hub cannot be reached (or the
    hub is set offline), instead of after the loader's retries (about 30 s) and its log lines.
    """
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    if spec != "demo" and looks_local and not path.is_dir():
        raise UsageError(
            f"no model directory at {spec!r}; pass 'demo', a local Hugging Face model folder, or a hub name"
        )
    if spec == "demo" or looks_local or _in_hub_cache(spec):
        return
    offline = any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if offline or not _reachable(endpoint):
        why = "the hub is set offline (HF_HUB_OFFLINE)" if offline else f"the hub ({endpoint}) cannot be reached"
        raise UsageError(
            f"--model {spec!r}: no folder of that name here and not in the Hugging Face cache, and {why}; pass "
            f"'demo', a local model folder (e.g. ./{spec} or its full path), or a hub name with the hub reachable"
        )


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a model of this hub name (then it loads without the network)."""
    root = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or "~/.cache/huggingface", "hub")
    return (Path(root).expanduser() / f"models--{name.replace('/', '--')}").is_dir()


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a connection to ``endpoint``'s host opens within ``timeout`` seconds (name lookup included).

    Behind a proxy (``HTTPS_PROXY`` and the like) the host is not contacted directly: the loader is left to try.
    """
    import concurrent.futures
    import socket
    import urllib.parse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)  # a name lookup that hangs is left behind, not waited for


def check_common(args: argparse.Namespace) -> None:
    """Every check that needs neither torch nor a model, in one place, before any import."""
    _check_device_syntax(args.device)
    if getattr(args, "model", None) is not None:
        _check_model_spec(args.model)
    low, high = DPI_RANGE
    if not math.isfinite(args.dpi) or not low <= args.dpi <= high:
        raise UsageError(
            f"--dpi {args.dpi:g}: give a resolution between {low:g} and {high:g} dots per inch (300 is print quality)"
        )
    for name in _COUNTS:
        value = getattr(args, name, None)
        if value is not None and not 1 <= value <= _MOST:
            raise UsageError(f"--{name.replace('_', '-')} {value}: give a positive number (at most {_MOST:,})")
    for name in ("seed", "position"):
        value = getattr(args, name, None)
        if value is not None and abs(value) > _MOST:
            raise UsageError(f"--{name} {value}: give a whole number between {-_MOST:,} and {_MOST:,}")
    check_out(args.out, args.overwrite)


# -- torch, devices, dtypes, models -------------------------------------------------------
def resolve_device(spec: str) -> Any:
    """``--device`` as a ``torch.device`` that exists on this machine, or a usage error saying why not."""
    import torch

    _check_device_syntax(spec)
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__} "
                "sees no CUDA device); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered 0..{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {spec}: no XPU is available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str) -> Any:
    """``--dtype`` name as a ``torch.dtype``."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """``demo``, a local HF model directory, or a hub name, as a TransformerLens model in eval mode.

    An HF folder is booted with the dtype and device directly; the demo model is built on the
    CPU in float32 and cast with ``.to``.
    """
    _check_model_spec(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if spec == "demo":
        from ..demo import demo_model
        from ..model_access import prepare_model

        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints what it moves and casts
            return prepare_model(demo_model(), dtype=torch_dtype, device=torch_device)
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists()
    from ..model_access import TransformerBridge

    if TransformerBridge is None:
        raise UsageError(
            "loading a Hugging Face model needs transformer-lens 3.x or 4.x (TransformerBridge); "
            "with 2.x, load the model in Python and call tl_logitlens directly"
        )
    silence_loaded_libraries()
    try:
        model = TransformerBridge.boot_transformers(
            str(path) if looks_local else spec, device=str(torch_device), dtype=torch_dtype
        )
    except Exception as err:  # noqa: BLE001 - any loader failure is reported in one line
        where = f"the folder {spec!r}" if looks_local else f"the hub name {spec!r} (is the hub reachable?)"
        first_line = str(err).splitlines()[0][:200] if str(err) else ""  # one line, however long the loader's message
        raise UsageError(f"could not load a model from {where}: {type(err).__name__}: {first_line}") from None
    return model.eval()


def prompt_input(model: Any, prompts: Dict[str, Any]) -> Any:
    """Prompts as the API takes them: one text, a list of texts, or an id tensor ``[batch, pos]``."""
    if "tokens" in prompts:
        import torch

        return torch.tensor(prompts["tokens"], dtype=torch.long)
    if getattr(model, "tokenizer", None) is None:
        raise UsageError("this model has no tokenizer, so --prompt text cannot be read; pass --tokens ids instead")
    text = prompts["text"]
    return text[0] if len(text) == 1 else text


def tokens_arg(values: Optional[Sequence[str]], option: str) -> Any:
    """Repeated ``--answer``/``--wrong``: one token shared by all prompts, or one per prompt."""
    if not values:
        return None
    tokens = [parse_token(v, option) for v in values]
    return tokens[0] if len(tokens) == 1 else tokens


def read_data(path: str) -> Any:
    """A ``.pt`` token tensor ``[n, seq]`` or a UTF-8 text file (one document per line), checked."""
    what = "a UTF-8 text file (one document per line) or a .pt token tensor [n, seq]"
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no data file at {path!r}; pass {what}")
    if file.suffix == ".pt":
        import torch

        try:
            data = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file, in one line
            raise UsageError(
                f"--data {path!r} is not a readable torch file ({type(err).__name__}); pass {what}"
            ) from None
        if not isinstance(data, torch.Tensor):
            raise UsageError(f"--data {path!r} holds a {type(data).__name__}, not a token tensor [n, seq]")
        if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool or data.ndim not in (1, 2):
            raise UsageError(
                f"--data {path!r} holds a {data.dtype} tensor of shape {tuple(data.shape)}; "
                "expected integer token ids [n, seq]"
            )
        if data.numel() == 0:
            raise UsageError(f"--data {path!r} holds an empty tensor")
        return data if data.ndim == 2 else data.unsqueeze(0)
    text = _read_text(path, what, "--data")
    docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise UsageError(f"--data {path!r} holds no text")
    return docs


def check_html(html: Optional[str], overwrite: bool = False, plotly: str = "directory") -> Optional[Path]:
    """The ``--html`` page's path, refused before any work if it (or, with ``--plotly directory``, the
    ``plotly.min.js`` beside it) cannot be written, or plotly is missing. A missing folder is created when the
    page is written (like ``--out``), so ``--out DIR --html DIR/lens.html`` works."""
    if html is None:
        return None
    import importlib.util

    path = Path(html)
    if path.is_dir():
        raise UsageError(f"--html {html!r} is a folder; name the page's file, e.g. {str(path / 'lens.html')!r}")
    try:
        if not path.parent.is_dir():
            check_folder(path.parent, overwrite=True, what="--html", mend=_OVERWRITE)  # writable; made at write time
        else:
            check_file(path, overwrite=overwrite, what="--html", mark=HTML_MARK, mend=_OVERWRITE)
            if plotly == "directory":
                check_file(
                    path.parent / _PLOTLY_FILE, overwrite=overwrite, what="--html", mark=JS_MARK, mend=_OVERWRITE
                )
    except LensInputError as err:
        raise UsageError(str(err)) from None
    if importlib.util.find_spec("plotly") is None:
        raise UsageError("--html needs plotly for the interactive page: pip install tl-logitlens[interactive]")
    return path
