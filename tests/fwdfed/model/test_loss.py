"""The causal-LM loss over chunks of positions equals the loss over all logits at once."""

import pytest
import torch
from torch import nn

from fwdfed.bundle.tasks import CAUSAL_LM, IGNORE_INDEX
from fwdfed.model.loss import ChunkedCausalLoss, per_example_loss, positions_per_chunk


@pytest.mark.parametrize("chunk", [1, 3, 4, 15, 40])
def test_chunked_loss_equals_the_whole_logits_loss(chunk):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 16, 8, generator=g)
    labels = torch.randint(0, 50, (3, 16), generator=g)
    labels[1, 9:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a filler row: loss 0
    with torch.no_grad():
        whole = per_example_loss(head(hidden), labels, CAUSAL_LM)
        chunked = ChunkedCausalLoss(head)(hidden, labels, chunk)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert whole[2] == 0


@pytest.mark.parametrize("positions, p, chunk", [(127, 1, 127), (127, 8, 16), (15, 4, 4), (3, 8, 1)])
def test_at_the_largest_p_a_chunk_has_no_more_rows_than_one_batch(positions, p, chunk):
    assert positions_per_chunk(positions, p) == chunk and p * chunk < positions + p
