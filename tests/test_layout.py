"""vqfast.layout: the nearest-upsampling table every backend reads is F.interpolate's choice."""

import pytest
import torch
import torch.nn.functional as F

from vqfast import layout


@pytest.mark.parametrize(
    "big,small",
    [((8, 8), (4, 4)), ((7, 5), (3, 2)), ((32, 32), (32, 32)), ((5,), (3,)), ((6, 9, 4), (2, 3, 3))],
)
def test_nearest_source_is_f_interpolate(big, small):
    grid = torch.arange(torch.Size(small).numel(), dtype=torch.float64).view(1, 1, *small)
    expected = F.interpolate(grid, size=big, mode="nearest").reshape(-1).long()
    source = layout.nearest_source(big, small, torch.device("cpu"))
    assert source.dtype == torch.long and source.is_contiguous()
    assert torch.equal(source, expected)


def test_nearest_source_of_an_empty_grid_is_empty():
    assert layout.nearest_source((0, 3), (1, 1), torch.device("cpu")).shape == (0,)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: torch.empty(2, 3, 4, 5), torch.contiguous_format),
        (lambda: torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.channels_last),
        (lambda: torch.empty(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d), torch.channels_last_3d),
        (lambda: torch.empty(2, 3, 4, 5).transpose(2, 3), torch.contiguous_format),
    ],
)
def test_memory_format(make, expected):
    assert layout.memory_format(make()) == expected
