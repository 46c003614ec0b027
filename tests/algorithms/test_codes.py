import torch

from rsavq.algorithms.codes import code_step

BOOKS = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # [P=1, K=4, d=2]


def test_codes_move_to_the_codeword_nearest_their_newton_target():
    idx = torch.zeros(2, 3, 1, dtype=torch.long)  # every vector at (0, 0)
    grad = torch.zeros(2, 3, 1, 2)
    grad[0, 0, 0] = torch.tensor([-1.0, 0.0])  # target (1, 0): predicted change -1 + 1/2
    grad[0, 1, 0] = torch.tensor([0.0, -2.0])  # target (0, 2): nearest (0, 1)
    grad[1, 2, 0] = torch.tensor([-0.1, 0.0])  # target (0.1, 0): stays
    changed = code_step(idx, BOOKS, grad, torch.ones_like(grad), fraction=1.0)
    assert changed == 2
    assert idx.flatten().tolist() == [1, 2, 0, 0, 0, 0]


def test_at_most_a_fraction_changes_the_most_helpful_first():
    idx = torch.zeros(1, 4, 1, dtype=torch.long)
    grad = torch.zeros(1, 4, 1, 2)
    grad[0, :, 0, 0] = torch.tensor([-1.2, -3.0, -2.0, -0.4])  # all pull towards +x
    changed = code_step(idx, BOOKS, grad, torch.ones_like(grad), fraction=0.5)
    assert changed == 2 and idx.flatten().tolist() == [0, 1, 1, 0]  # the two largest gains


def test_high_curvature_keeps_a_code_the_gradient_alone_would_move():
    idx = torch.zeros(1, 1, 1, dtype=torch.long)
    grad = torch.tensor([[[[-1.0, 0.0]]]])  # moving to (1, 0): -1 + 1/2 * h
    assert code_step(idx, BOOKS, grad, torch.full_like(grad, 10.0), fraction=1.0) == 0
    assert idx.item() == 0  # predicted +4: the loss would rise
    assert code_step(idx, BOOKS, grad, torch.full_like(grad, 1.0), fraction=1.0) == 1
