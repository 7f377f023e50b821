"""Pieces both the torch loop and the compiled loop build their sweeps from: the input
projection for all steps, the weight gradients as large GEMMs after a reverse sweep, and
the handling of unused and masked gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from whiteboard.backends.compiled import planning


def input_projection(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """X @ W_ihᵀ + b for all time steps in one GEMM. x (T, B, I) -> (T, B, G·H)."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    out = torch.mm(x2, w_ih.t()) if bias is None else torch.addmm(bias, x2, w_ih.t())
    return out.view(T, B, w_ih.shape[0])  # not -1: a batch of 0 rows leaves it undetermined


def sum_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    if b_ih is None:
        return None
    return b_ih + b_hh


class WeightGrads:
    """dX, dW_ih, dW_hh from pre-activation gradients dZ (steps, B, G·H) as large GEMMs over
    all steps x B rows, for all steps at once or a chunk of steps at a time. ``needs``:
    whether dX, dW_ih, dW_hh are wanted."""

    def __init__(self, x: Tensor, h_prev: Tensor, w_ih: Tensor, hidden: int, needs: tuple, compiled=None):
        # From the compiled loop's pool where there is one (see planning.empty): a large
        # model's gradients are tens of MB of fresh pages per step otherwise.
        self.x, self.h_prev, self.w_ih, self.needs = x, h_prev, w_ih, needs
        self.dx = planning.empty(x.shape, x, compiled) if needs[0] else None  # (T, B, I)
        self.dw_ih = planning.empty(w_ih.shape, x, compiled) if needs[1] else None  # (G·H, I)
        self.dw_hh = planning.empty((w_ih.shape[0], hidden), x, compiled) if needs[2] else None  # (G·H, H)
        self.beta = 0  # the first chunk overwrites (beta 0 ignores what new_empty left there)

    def add(self, dz: Tensor, begin: int, end: int, hidden_blocks=None) -> None:
        """dz: steps [begin, end). hidden_blocks: [(rows of dW_hh, dZ_h block (rows, k))] where
        the hidden projection's gradient is not dz itself (the GRU's n block)."""
        # Sizes spelled out, not -1: a batch of 0 rows leaves -1 undetermined.
        count = (end - begin) * dz.shape[1]
        rows = dz.reshape(count, dz.shape[-1])  # ((end-begin)·B, G·H)
        if self.needs[0]:
            torch.mm(rows, self.w_ih, out=self.dx[begin:end].view(count, self.x.shape[-1]))
        if self.needs[1]:
            self.dw_ih.addmm_(rows.t(), self.x[begin:end].reshape(count, self.x.shape[-1]), beta=self.beta)
        if self.needs[2]:
            h_prev = self.h_prev[begin:end].reshape(count, self.h_prev.shape[-1])
            for target, block in hidden_blocks or [(slice(None), rows)]:
                self.dw_hh[target].addmm_(block.t(), h_prev, beta=self.beta)
        self.beta = 1

    def result(self) -> tuple:
        return self.dx, self.dw_ih, self.dw_hh


def weight_grads(dz: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, needs: tuple) -> tuple:
    """dX, dW_ih, dW_hh from the pre-activation gradients dz (T, B, G·H) for all steps."""
    grads = WeightGrads(x, h_prev, w_ih, h_prev.shape[-1], needs)
    grads.add(dz, 0, x.shape[0])
    return grads.result()


def state_grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """The gradient reaching a final state, as a fresh buffer the reverse sweep may
    overwrite; zeros when that state was not used."""
    return torch.zeros_like(like) if grad is None else grad.contiguous().clone()


def output_grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """The gradient of the output sequence (contiguous); zeros when it was not used."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def carry(alive: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the sequence is still running (alive, (B, 1) bool), ``old`` where it has
    ended: a finished sequence carries its state (or its gradient) through the step."""
    return new if alive is None else torch.where(alive, new, old)


def masked_output(hs: Tensor, mask: Tensor | None) -> Tensor:
    """The output sequence from the states (T+1, B, H): zero beyond each sequence's end."""
    return hs[1:] if mask is None else hs[1:] * mask
