"""The differentiable lens loss (train_kernel) against full float64 logits, tile by tile, without whole logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tl_logitlens.errors import LensInputError
from tl_logitlens.kernel import loss as tk
from tl_logitlens.kernel import tuning
from tl_logitlens.kernel.tiles import BUFFERS

# (d_vocab, width): ragged tiles (7 and 13 do not divide 61), one tile, a width beyond the vocabulary.
TILINGS = [(61, 7), (61, 13), (61, 61), (61, 100), (50, 8)]


def _problem(d_vocab, *, layers=3, rows=10, d_model=8, bias=True, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(d_model, d_vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = torch.randn(d_vocab, generator=g, dtype=torch.float64).to(dtype) if bias else None
    x_final = torch.randn(rows, d_model, generator=g, dtype=torch.float64)
    x = torch.randn(layers, rows, d_model, generator=g, dtype=torch.float64)
    return W, b, x_final, x


def _reference_kl(x, W, b, x_final):
    """KL(p_final || softmax(x W + b)) through full float64 log-probabilities (autograd reference)."""
    W, x_final = W.double(), x_final.double()
    b = b.double() if b is not None else None
    lx = x @ W + (b if b is not None else 0)
    lf = x_final @ W + (b if b is not None else 0)
    log_p = torch.log_softmax(lf, -1)
    return (log_p.exp() * (log_p - torch.log_softmax(lx, -1))).sum(-1)


def _reference_ce(x, W, b, next_tokens):
    W = W.double()
    lx = x @ W + (b.double() if b is not None else 0)
    log_q = torch.log_softmax(lx, -1)
    keep = next_tokens >= 0
    picked = log_q[..., torch.arange(len(next_tokens)), next_tokens.clamp(min=0)]
    return torch.where(keep, -picked, torch.zeros_like(picked))


def _loss_and_grad(fn, x, weights):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("d_vocab,width", TILINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_kl_value_and_gradient_match_float64_autograd(d_vocab, width, bias):
    W, b, x_final, x = _problem(d_vocab, bias=bias)
    weights = torch.rand(x.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours, g_ours = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, final=x_final, width=width), x, weights)
    ref, g_ref = _loss_and_grad(lambda v: _reference_kl(v, W, b, x_final), x, weights)
    assert ours.shape == (3, 10)
    assert _rel(ours, ref) <= 1e-6 and _rel(g_ours, g_ref) <= 1e-6
    # Precomputed final statistics, shared across layers, give the same result.
    shared = tk.final_stats(x_final, W, b, width=width)
    assert _rel(tk.lens_loss(x, W, b, final=shared, width=width), ref) <= 1e-6


@pytest.mark.parametrize("d_vocab,width", [(61, 7), (61, 13)])
def test_ce_with_ignored_rows_matches_float64_autograd(d_vocab, width):
    W, b, _, x = _problem(d_vocab)
    t = torch.tensor([3, -1, 60, 0, 5, -1, 17, 8, 59, 1])
    weights = torch.rand(x.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ours, g_ours = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, next_tokens=t, loss="ce", width=width), x, weights)
    ref, g_ref = _loss_and_grad(lambda v: _reference_ce(v, W, b, t), x, weights)
    assert _rel(ours, ref) <= 1e-6 and _rel(g_ours, g_ref) <= 1e-6
    # Ignored rows: no loss and no gradient.
    assert (ours[:, t < 0] == 0).all() and (g_ours[:, t < 0] == 0).all()
    assert (ours[:, t >= 0] > 0).all()


def test_gradcheck_on_a_tiny_float64_problem():
    W, b, x_final, x = _problem(13, layers=2, rows=3, d_model=4)
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: tk.lens_loss(v, W, b, final=x_final, width=5), (x,))
    t = torch.tensor([2, -1, 12])
    assert torch.autograd.gradcheck(lambda v: tk.lens_loss(v, W, b, next_tokens=t, loss="ce", width=4), (x,))


def test_rows_in_several_chunks_give_the_same_numbers(monkeypatch):
    W, b, x_final, x = _problem(61, rows=10)
    whole = tk.lens_loss(x, W, b, final=x_final, width=7)
    monkeypatch.setattr(tk, "_TILE_BYTES", 3 * 7 * 8)  # 3 rows per chunk: ragged row chunks
    chunked = tk.lens_loss(x, W, b, final=x_final, width=7)
    assert _rel(chunked, whole) <= 1e-12


@pytest.mark.parametrize("d_vocab,width", TILINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_vectors_agree_with_float64_at_float32_tolerance(d_vocab, width, bias, stats_path):
    """Float32 KL and CE (the tile made ``exp(l - max)`` by the fused kernel or by tensor operations)
    against float64 autograd; scale 4 makes the running maxima rise across tiles, so the rescaling runs."""
    W, b, x_final, x = _problem(d_vocab, dtype=torch.float32, bias=bias, scale=4.0)
    t = torch.randint(-1, d_vocab, (10,), generator=torch.Generator().manual_seed(3))
    weights = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(4))
    kl, g_kl = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, final=x_final.float(), width=width), x.float(), weights)
    ce, g_ce = _loss_and_grad(
        lambda v: tk.lens_loss(v, W, b, next_tokens=t, loss="ce", width=width), x.float(), weights
    )
    ref, g_ref = _loss_and_grad(lambda v: _reference_kl(v, W, b, x_final), x, weights.double())
    ref_ce, g_ref_ce = _loss_and_grad(lambda v: _reference_ce(v, W, b, t), x, weights.double())
    tol = 50 * torch.finfo(torch.float32).eps  # a few ulps of log Z, which is about log d_vocab + |logits|
    assert kl.dtype == torch.float32 and g_kl.dtype == torch.float32
    assert _rel(kl, ref) <= tol and _rel(g_kl, g_ref) <= tol
    assert _rel(ce, ref_ce) <= tol and _rel(g_ce, g_ref_ce) <= tol


def test_no_gradient_reaches_the_unembedding_or_the_final_layer():
    W, b, x_final, x = _problem(61)
    W.requires_grad_(True)
    b.requires_grad_(True)
    x_final.requires_grad_(True)
    x.requires_grad_(True)
    tk.lens_loss(x, W, b, final=x_final, width=7).sum().backward()
    assert x.grad is not None and W.grad is None and b.grad is None and x_final.grad is None


def _spy_whole_casts(monkeypatch, whole):
    copies = []
    for name in ("to", "float", "double", "type"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not self and out.numel() >= whole and out.dtype != self.dtype:
                copies.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch.Tensor, name, spy)
    return copies


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_unembedding_matches_its_float64_upcast_and_is_never_cast_whole(monkeypatch, half, stats_path):
    W, b, x_final, x = _problem(61, dtype=half, scale=1.0)
    x, x_final = x.float(), x_final.float()
    t = torch.tensor([3, -1, 60, 0, 5, -1, 17, 8, 59, 1])
    weights = torch.ones(x.shape[:-1])
    copies = _spy_whole_casts(monkeypatch, W.numel())
    kl, g_kl = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, final=x_final, width=7), x, weights)
    ce, g_ce = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, next_tokens=t, loss="ce", width=7), x, weights)
    monkeypatch.undo()
    assert copies == []
    ref, g_ref = _loss_and_grad(lambda v: _reference_kl(v, W, b, x_final), x.double(), weights.double())
    ref_ce, g_ref_ce = _loss_and_grad(lambda v: _reference_ce(v, W, b, t), x.double(), weights.double())
    tol = 50 * torch.finfo(torch.float32).eps  # arithmetic is float32 on the exactly upcast weights
    assert _rel(kl, ref) <= tol and _rel(g_kl, g_ref) <= tol
    assert _rel(ce, ref_ce) <= tol and _rel(g_ce, g_ref_ce) <= tol


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_forward_and_backward_never_create_rows_by_vocabulary():
    rows, d_model, d_vocab = 512, 64, 50257
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_model, d_vocab, generator=g) * 0.1
    x_final = torch.randn(rows, d_model, generator=g)
    x = torch.randn(2, rows, d_model, generator=g, requires_grad=True)
    with _LargestTensor() as spy:
        loss = tk.lens_loss(x, W, final=x_final)
        loss.sum().backward()
    assert x.grad.shape == x.shape
    # One layer's logits would be rows x d_vocab (25.7M); a tile buffer is at most a third of the
    # CPU budget (8.4M floats: 1024 rows x 8192 columns where the tuner takes its widest tiles).
    largest_tile = tuning.CPU_BUDGET_BYTES // (BUFFERS * 4)
    assert largest_tile < rows * d_vocab // 2
    assert spy.largest <= largest_tile, spy.largest


def test_real_model_unembedding(models_dir):
    from tl_logitlens.model_access import TransformerBridge

    if TransformerBridge is None:
        pytest.skip("local HF models boot through TransformerBridge (3.x/4.x)")
    model = TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()
    W = model.W_U.detach()
    b = getattr(model, "b_U", None)
    b = b.detach() if b is not None else None
    g = torch.Generator().manual_seed(0)
    rows = 200
    # RMS-normalised random vectors, as the lens feeds after the final norm.
    x_final = torch.randn(rows, W.shape[0], generator=g)
    x = torch.randn(3, rows, W.shape[0], generator=g)
    t = torch.randint(-1, W.shape[1], (rows,), generator=g)
    weights = torch.rand(3, rows, generator=g, dtype=torch.float64)
    for width in (37, 128):  # 37 does not divide the vocabulary of 512
        ours, g_ours = _loss_and_grad(lambda v: tk.lens_loss(v, W, b, final=x_final, width=width), x.double(), weights)
        ref, g_ref = _loss_and_grad(lambda v: _reference_kl(v, W, b, x_final), x.double(), weights)
        assert _rel(ours, ref) <= 1e-6 and _rel(g_ours, g_ref) <= 1e-6
        ce, g_ce = _loss_and_grad(
            lambda v: tk.lens_loss(v, W, b, next_tokens=t, loss="ce", width=width), x.double(), weights
        )
        ref_ce, g_ref_ce = _loss_and_grad(lambda v: _reference_ce(v, W, b, t), x.double(), weights)
        assert _rel(ce, ref_ce) <= 1e-6 and _rel(g_ce, g_ref_ce) <= 1e-6


def test_no_rows_give_an_empty_loss():
    W, b, x_final, x = _problem(61)
    empty = torch.zeros(3, 0, 8, dtype=torch.float64, requires_grad=True)
    out = tk.lens_loss(empty, W, b, next_tokens=torch.zeros(0, dtype=torch.long), loss="ce", width=7)
    assert out.shape == (3, 0)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_autograd(w_dtype):
    W, b, x_final, x = _problem(61, dtype=w_dtype, scale=1.0)
    weights = torch.rand(x.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref, g_ref = _loss_and_grad(lambda v: _reference_kl(v, W, b, x_final), x, weights)
    cuda = torch.device("cuda")
    ours, g_ours = _loss_and_grad(
        lambda v: tk.lens_loss(v, W.to(cuda), b.to(cuda), final=x_final.float().to(cuda), width=7),
        x.float().to(cuda),
        weights.float().to(cuda),
    )
    tol = 50 * torch.finfo(torch.float32).eps
    assert ours.device.type == "cuda" and _rel(ours.cpu(), ref) <= tol and _rel(g_ours.cpu(), g_ref) <= tol


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda W, b, xf, x: tk.lens_loss(x, W.t(), b, final=xf), "transpose"),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b[:-1], final=xf), r"b must be \[d_vocab\]"),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b), "needs final="),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b, final=xf[:-1]), "same 10 rows"),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b, loss="mse", final=xf), 'loss must be "kl" or "ce"'),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b, loss="ce", next_tokens=torch.full((10,), 61)), r"lie in \[0, 61\)"),
        (
            lambda W, b, xf, x: tk.lens_loss(x, W, b, loss="ce", next_tokens=torch.zeros(9, dtype=torch.long)),
            r"next_tokens as an integer tensor \[rows\]",
        ),
        (
            lambda W, b, xf, x: tk.lens_loss(
                x, W, b, loss="ce", final=xf, next_tokens=torch.zeros(10, dtype=torch.long)
            ),
            "final= is for",
        ),
        (lambda W, b, xf, x: tk.lens_loss(x, W, b, final=xf, width=0), "width must be a positive int"),
        (lambda W, b, xf, x: tk.lens_loss(x.long(), W, b, final=xf), "floating-point"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, match):
    W, b, x_final, x = _problem(61)
    with pytest.raises(LensInputError, match=match):
        call(W, b, x_final, x)
