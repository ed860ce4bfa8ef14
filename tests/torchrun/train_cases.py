"""The training runs of the torchrun jobs, built identically in the job and in the test that checks it.

Each case is ``name -> (data factory, train_tuned_lens keyword arguments)``. Batch size 1 and
40 tokens per step over rows of 11 scored tokens make each step 4 micro-batches (11, 11, 11
and a cut 7), dealt unevenly over 3 ranks; 12 rows hold 132 tokens, so the data runs out in
the middle of the fourth step of ``ran_out``.
"""

import torch


def ids(model, rows, seq, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(5, model.cfg.d_vocab, (rows, seq), generator=g)
    out[:, 0] = 1  # <bos>
    return out


COMMON = {"tokens_per_step": 40, "batch_size": 1, "progress": False}

CASES = {
    # Three steps of 4 micro-batches: on 3 ranks one rank runs two per step (which one rotates).
    "ragged": (lambda m: ids(m, 12, 12, 20), dict(COMMON, steps=3)),
    # Rows of 2 and the last micro-batch cut: batch size 2 and SGD's Adam sibling.
    "adam_batches": (
        lambda m: ids(m, 9, 9, 21),
        dict(COMMON, steps=3, batch_size=2, optimizer="adam", tokens_per_step=30),
    ),
    # Four steps of 40 planned, 132 tokens held: the last step is partial (12 tokens), averaged over them.
    "ran_out": (lambda m: ids(m, 12, 12, 22), dict(COMMON, steps=4)),
}

# The run the fault job interrupts at step 3 and the resume job finishes (checkpoint every step).
RESUME = (lambda m: ids(m, 12, 12, 23), dict(COMMON, steps=4, checkpoint_every=1))
FAIL_AT_STEP = 3
