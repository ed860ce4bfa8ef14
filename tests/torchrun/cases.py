"""The data of the torchrun jobs, built identically in the job and in the test that checks it.

Each case is ``name -> (data factory, evaluate_lens keyword arguments)``; a factory takes
``(model, distributed)`` so the DataLoader with a DistributedSampler case can build its sampler
inside the job and a plain loader over the same rows for the one-process reference.
"""

import torch


def _ids(model, rows, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.cfg.d_vocab, (rows, seq), generator=g)
    ids[:, 0] = 1  # <bos>
    return ids


def _words(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = 3 + int(torch.randint(0, 12, (1,), generator=g))  # ragged: padding inside batches
        ids = torch.randint(5, model.cfg.d_vocab, (length,), generator=g).tolist()
        out.append(" ".join(model.tokenizer.decode([t]).strip() for t in ids))
    return out


def _loader(model, distributed):
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(_ids(model, 6, 10, 4))
    if not distributed:
        return DataLoader(data, batch_size=2)
    from torch.utils.data import DistributedSampler

    return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False))


def _plain_loader(model, distributed):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(_ids(model, 7, 9, 5)), batch_size=2)  # 4 batches: sharded by batch index


CASES = {
    "tensor_ragged": (lambda m, d: _ids(m, 7, 12, 0), {"batch_size": 3}),
    "tensor_batch_size_1": (lambda m, d: _ids(m, 5, 12, 8), {"batch_size": 1}),  # forward passes bitwise alike
    "tensor_max_tokens": (lambda m, d: _ids(m, 7, 12, 1), {"batch_size": 2, "max_tokens": 25}),
    "tensor_fewer_rows_than_ranks": (lambda m, d: _ids(m, 2, 8, 2), {}),
    "tensor_long_windows": (lambda m, d: _ids(m, 4, 100, 3), {"batch_size": 2}),
    "strings": (lambda m, d: _words(m, 8, 6), {"batch_size": 3}),
    "string_iterable": (lambda m, d: iter(_words(m, 5, 7)), {"batch_size": 2}),
    "loader_distributed_sampler": (_loader, {}),
    "loader_plain": (_plain_loader, {}),
}


def compare_case(model, distributed):
    """Data and lenses of the job's compare_lenses run: ragged rows, the logit lens and a seeded TunedLens."""
    import tl_logitlens as tll

    tuned = tll.TunedLens(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return _ids(model, 7, 12, 9), {"logit": None, "tuned": tuned}
