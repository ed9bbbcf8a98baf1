"""The Triton launch's work table: every element of every tensor is covered by exactly one row."""

from __future__ import annotations

import pytest
import torch

triton_optim = pytest.importorskip("resfast.kernels.triton_optim")


def test_rows_cover_each_tensor_once():
    sizes = [0, 1, triton_optim.BLOCK - 1, triton_optim.BLOCK, 3 * triton_optim.BLOCK + 5, 0, 7]
    tensors = [torch.empty(n) for n in sizes]
    rows, table = triton_optim._work_table([tensors, tensors], torch.device("cpu"))
    assert table[:, -1].tolist() == sizes
    assert table[:, 0].tolist() == [t.data_ptr() for t in tensors]
    for index, n in enumerate(sizes):
        starts = rows[rows[:, 0] == index, 1].tolist()
        assert starts == list(range(0, n, triton_optim.BLOCK))  # no gap, no overlap, no empty row


def test_table_is_cached_while_addresses_hold():
    tensors = [torch.empty(5), torch.empty(9)]
    first = triton_optim._work_table([tensors], torch.device("cpu"))
    assert triton_optim._work_table([tensors], torch.device("cpu")) is first
    moved = [tensors[0], torch.empty(9)]
    assert triton_optim._work_table([moved], torch.device("cpu")) is not first


def test_row_offsets_are_64_bit():
    """Chunk starts past 2^31 elements must not wrap (sizes only: nothing that large is allocated)."""
    n = 2**31 + 3 * triton_optim.BLOCK + 1
    rows = triton_optim._rows([5, n])
    assert rows.dtype == torch.int64
    last_start = rows[-1, 1].item()
    assert last_start == n - 1 and last_start > 2**31  # the final 1-element chunk of the big tensor
    assert rows.shape[0] == 1 + -(-n // triton_optim.BLOCK)
