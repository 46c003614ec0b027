import pytest
import torch

from rsavq.algorithms.kmeans import CHUNK_ELEMENTS, assign, kmeans, update


def test_assignment_is_the_nearest_codeword_by_definition():
    gen = torch.Generator().manual_seed(0)
    n = CHUNK_ELEMENTS // 4 + 37  # several chunks of points
    X, w, C = torch.randn(n, 3, generator=gen), torch.rand(n, 3, generator=gen), torch.randn(4, 3)
    distances = ((X[:, None] - C[None]) ** 2 * w[:, None]).sum(-1)
    codes, loss = assign(X, w, C)
    best = distances.min(dim=1)
    assert torch.equal(codes, best.indices)
    assert loss == pytest.approx(best.values.double().sum().item(), rel=1e-5)


def test_the_cpu_kernel_and_the_chunked_products_assign_alike(monkeypatch):
    from rsavq.algorithms import kmeans as module

    gen = torch.Generator().manual_seed(3)
    X, w, C = (
        torch.randn(999, 2, generator=gen),
        torch.rand(999, 2, generator=gen),
        torch.randn(40, 2),
    )
    fused = assign(X, w, C)
    monkeypatch.setattr(module, "_nearest_kernel", lambda lhs: None)
    chunked = assign(X, w, C)
    assert torch.equal(fused[0], chunked[0])
    assert fused[1] == pytest.approx(chunked[1], rel=1e-5)


def test_update_is_weighted_mean_and_ignores_zero_weights():
    X = torch.tensor([[0.0, 0.0], [2.0, 4.0], [100.0, 100.0]])
    w = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 0.0]])  # last point is padding
    C = update(X, w, torch.tensor([0, 0, 0]), torch.zeros(2, 2))
    torch.testing.assert_close(C[0], torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(C[1], torch.zeros(2))  # empty codeword keeps its value


def test_kmeans_finds_separated_clusters_deterministically():
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    X = (centers[:, None] + 0.1 * torch.randn(4, 50, 2, generator=gen)).reshape(-1, 2)
    w = torch.ones_like(X)
    a = kmeans(X, w, 4, generator=torch.Generator().manual_seed(0))
    b = kmeans(X, w, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.centroids, b.centroids)
    found = a.centroids[a.centroids[:, 0].argsort(stable=True)]
    assert torch.cdist(found, centers).min(dim=1).values.max() < 0.1
    assert a.loss < 200 * 0.1**2 * 4


def test_loss_never_increases():
    gen = torch.Generator().manual_seed(2)
    X, w = torch.randn(300, 3, generator=gen), torch.rand(300, 3, generator=gen)
    one = kmeans(X, w, 16, iters=1, tol=0, generator=torch.Generator().manual_seed(0))
    many = kmeans(X, w, 16, iters=15, tol=0, generator=torch.Generator().manual_seed(0))
    assert many.loss <= one.loss
    assert assign(X, w, many.centroids)[1] == many.loss
