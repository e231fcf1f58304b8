"""mean_aggregate: exact means on hand-made tensors, determinism, loud errors."""
import pytest
import torch

from fedrpc.algorithms import mean_aggregate


def _uploads():
    return {"C": torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]], [[5.0, 10.0]]]),  # [3, 1, 2]
            "b2": torch.tensor([0.0, 3.0, 6.0])}


def test_plain_mean_exact():
    out = mean_aggregate(_uploads())
    assert torch.equal(out["C"], torch.tensor([[3.0, 6.0]]))
    assert torch.equal(out["b2"], torch.tensor(3.0))


def test_weighted_mean_exact_and_normalised():
    out = mean_aggregate(_uploads(), weights=torch.tensor([2.0, 1.0, 1.0]))
    # (2*[1,2] + [3,6] + [5,10]) / 4
    assert torch.equal(out["C"], torch.tensor([[2.5, 5.0]]))  # weights 1/2, 1/4, 1/4 exact
    assert torch.equal(out["b2"], torch.tensor(2.25))
    scaled = mean_aggregate(_uploads(), weights=torch.tensor([20, 10, 10]))
    assert torch.allclose(scaled["C"], out["C"])


def test_zero_weight_ignores_client_and_dtype_kept():
    u = {"x": torch.tensor([[1.0], [100.0]], dtype=torch.float64)}
    out = mean_aggregate(u, weights=torch.tensor([1.0, 0.0]))
    assert out["x"].dtype == torch.float64 and out["x"].item() == 1.0


def test_deterministic_bit_identical():
    g = torch.Generator().manual_seed(0)
    u = {"C": torch.randn(37, 50, 8, generator=g), "w": torch.randn(37, 16, generator=g)}
    w = torch.rand(37, generator=g)
    for weights in (None, w):
        a, b = mean_aggregate(u, weights), mean_aggregate(u, weights)
        assert all(torch.equal(a[k], b[k]) for k in u)


@pytest.mark.parametrize("uploads,weights,match", [
    ({}, None, "no uploads"),
    ({"C": torch.zeros(0, 3)}, None, "N == 0"),
    ({"C": torch.zeros(2, 3), "b": torch.zeros(3)}, None, "disagree"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, float("nan")]), "finite"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, float("inf")]), "finite"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, -1.0]), ">= 0"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([0.0, 0.0]), "positive sum"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, 1.0, 1.0]), "expected N=2"),
    ({"C": torch.zeros(2, 3, dtype=torch.long)}, None, "floating"),
])
def test_errors(uploads, weights, match):
    with pytest.raises(ValueError, match=match):
        mean_aggregate(uploads, weights)
