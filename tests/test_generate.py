import torch

from whiteboard.lm.generate import sample_next, top_k_filter, top_p_filter


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


def test_sampling_follows_its_generator_alone_and_respects_top_k():
    logits = torch.randn(1, 50)
    draw = lambda seed: [int(sample_next(logits, 1.0, top_k=10, generator=generator)) for generator in  # noqa: E731
                         [torch.Generator().manual_seed(seed)] for _ in range(40)]
    state = torch.get_rng_state()
    assert draw(5) == draw(5)  # the same seed, the same draws
    assert draw(5) != draw(6)  # another seed, other draws: the generator is used
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator is not
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 2.0, top_k=3, generator=gen)) for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1
