"""The ``tl-logitlens`` command line: the package's analyses on prompts, from a terminal.

Commands (``tl-logitlens COMMAND --help`` documents every option with an example)::

    tl-logitlens demo [--n N] [--out DIR]
    tl-logitlens lens --model MODEL (--prompt TEXT ... | --prompts FILE | --tokens IDS ...) [--position P]
                      [--layers L,..] [--metric M] [--top-k K] [--target TOKEN ...] [--norm N] [--out DIR]
    tl-logitlens patchscope --model MODEL (--prompt TEXT ... | --prompts FILE | --tokens IDS ...) [--position P]
                      [--target TEXT] [--layers L,..] [--top-k K] [--quiet] [--out DIR]
    tl-logitlens dla  --model MODEL (--prompt ... | --prompts ... | --tokens ...) --answer TOKEN [--wrong TOKEN]
                      [--by KIND] [--norm cached|none] [--position P] [--top-k K] [--out DIR]
    tl-logitlens eval --model MODEL --data FILE [--max-tokens N] [--out DIR]
    tl-logitlens train-lens --model MODEL --data FILE [--steps N] [--tokens-per-step N] [--batch-size N]
                      [--loss kl|ce] [--incl-mid] [--checkpoint-every N] [--out DIR] [--resume]

``lens``, ``patchscope``, ``dla`` and ``eval`` also take ``--html PATH``: an interactive page of the result (needs
plotly; its folder is created if missing), which loads one ``plotly.min.js`` written beside it
(``--plotly directory``, the default; ``inline`` puts plotly.js inside the page, ``cdn`` loads it
from the network). ``demo --out DIR`` writes ``DIR/index.html`` linking every file.
Every command also takes ``--device``, ``--dtype``, ``--format png|pdf|svg``, ``--dpi``,
``--overwrite`` and ``--verbose``. Writers own their files (:mod:`tl_logitlens.files`): an ``--out``
folder holding files tl-logitlens did not write there, or an ``--html`` file it did not write, is
refused before any work unless ``--overwrite`` is given. ``MODEL`` is ``demo`` (the built-in
model), a local Hugging Face model folder (booted through ``TransformerBridge``, transformer-lens
3.x/4.x), or a hub name (needs the hub).
A token (``--answer``, ``--wrong``, ``--target``) is its text or vocabulary piece, or ``id:N``
for the id ``N`` (so that ``317`` stays the text "317").

Usage errors exit with status 2 and one line on stderr, never a traceback. Building the parser
imports neither torch nor transformer_lens, matplotlib or pandas, and every argument is checked
(numbers for finiteness and range, files and folders for what they hold) before any of them is
imported, so ``--help`` and usage errors answer at once; the heavy imports happen inside the
commands. A file that cannot be written gives one line and status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..errors import LensInputError, ModelStateError, NonFiniteActivationError, RankFailedError, UnsupportedModelError
from .arguments import UsageError, check_common
from .commands import GRAD_STATE
from .output import output_policy
from .parser import build_parser

__all__ = ["UsageError", "build_parser", "main"]


#: How long an idle OpenMP thread spins before it sleeps, set for the command's own process (never
#: over a user's ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``). libgomp's default, 300,000 spins, keeps
#: a thread spinning through every gap between torch's parallel regions; when another process
#: wants the cores, that spinning takes them from the thread with the work. On the project's
#: 2-core Xeon beside a busy neighbour, SmolLM2-135M's forward pass took 2.56 s at the default and
#: 0.54 s at 10,000 spins (quiet: 145 and 147 ms), Gemma-3-270m's lens 1.35 and 1.17 x its product.
OPENMP_SPIN_COUNT = "10000"


def _short_openmp_spins() -> None:
    """Set ``GOMP_SPINCOUNT`` for this process before torch (and its libgomp, which reads it once) loads."""
    if "torch" not in sys.modules and not ({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ)):
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tl-logitlens`` and ``python -m tl_logitlens``; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    _short_openmp_spins()
    try:
        args = build_parser().parse_args(argv)
        check_common(args)
        with output_policy(args.verbose):
            args.func(args)
    except UsageError as err:
        print(f"tl-logitlens: error: {err}", file=sys.stderr)
        return 2
    except (LensInputError, ModelStateError, UnsupportedModelError, NonFiniteActivationError) as err:
        # The package's messages name the problem and the mend; one line here, whatever their layout.
        print(
            f"tl-logitlens: error: {_rank_prefix()}{' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr
        )
        return 2
    except OSError as err:  # a file or folder that cannot be read or written, found while writing
        print(f"tl-logitlens: error: {_rank_prefix()}{err}", file=sys.stderr)
        return 1
    except RankFailedError as err:  # under torchrun: another rank failed; rank 0 says which, the rest stay silent
        if not _rank_prefix() or _rank_prefix() == "rank 0: ":
            print(f"tl-logitlens: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    finally:
        while GRAD_STATE:
            import torch

            torch.set_grad_enabled(GRAD_STATE.pop())
    return 0


def _rank_prefix() -> str:
    """``"rank R: "`` inside a process group of several ranks (so a failing rank is named), else ``""``."""
    if "torch" not in sys.modules:
        return ""
    from ..distributed import rank_and_world

    rank, world = rank_and_world()
    return f"rank {rank}: " if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
