import torch

from whiteboard.generate import sample_next, top_k_filter, top_p_filter


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_top_k_keeps_the_k_largest():
    out = top_k_filter(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(probs.log(), 0.75)
    assert torch.isinf(out).tolist() == [[False, False, True, True]]
    assert not torch.isinf(top_p_filter(probs.log(), 1.0)).any()


def test_sampling_is_deterministic_under_a_generator_and_respects_top_k():
    logits = torch.randn(1, 50)
    draw = lambda seed: [int(sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(seed))) for _ in range(1)]  # noqa: E731
    assert draw(5) == draw(5)
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    gen = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 2.0, top_k=3, generator=gen)) for _ in range(200)} <= allowed
