"""Adversarial training on the input embeddings: FGM (Miyato et al. 2017) and PGD (Madry et al. 2018).

A perturbation `r` is added to the word-embedding layer's output (the vectors the encoder reads, before
position embeddings and layer norm), so it works whether the embedding matrix trains (full) or is frozen
(LoRA, IA3, head-only, ...): what learns is every trained weight downstream of it.

- FGM: one clean forward/backward; r = epsilon * g / ||g|| with g the loss gradient at the embeddings (the
  norm per example, over its tokens and dimensions); one more forward/backward on the perturbed input. The
  step's gradient is the sum of both: about twice the cost of a plain step.
- PGD: the clean pass, then `steps` ascent steps of size alpha (1.5 x epsilon / steps), each projected back
  into the epsilon ball (the first from the clean gradient, each other one a forward/backward that moves r
  only); the final perturbed pass's gradient joins the clean one: 2 + steps - 1 passes a step.

The loss the run reports is the clean loss.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

__all__ = ["EmbeddingAttack", "attack_for"]

ALPHA_SHARE = 1.5  # PGD's step size = ALPHA_SHARE x epsilon / steps: a few steps can reach the ball's edge


def attack_for(config: Any, model: torch.nn.Module) -> "EmbeddingAttack | None":
    """The run's attack (None when train.adversarial is off)."""
    kind = config.train.adversarial
    if kind == "off":
        return None
    return EmbeddingAttack(model, kind, config.train.adversarial_epsilon, config.train.adversarial_steps)


class EmbeddingAttack:
    """Perturbs a model's input-embedding output during training steps (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, kind: str, epsilon: float, steps: int = 3) -> None:
        if kind not in ("fgm", "pgd"):
            raise ValueError(f"unknown attack {kind!r}")
        self.embeddings = model.get_input_embeddings()
        self.kind, self.epsilon, self.steps = kind, float(epsilon), max(1, int(steps))

    @contextlib.contextmanager
    def _adding(self, delta: torch.Tensor) -> Iterator[None]:
        def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return output + delta.to(output.dtype)

        handle = self.embeddings.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _unit(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient scaled to norm 1 per example (over tokens and dimensions)."""
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / norm.view(-1, *([1] * (grad.dim() - 1)))

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        norm = r.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(self.epsilon / norm, max=1.0)
        return r * factor.view(-1, *([1] * (r.dim() - 1)))

    def step(self, loss_of: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """One micro-batch: the clean loss and its backward, then the adversarial pass(es) and backward.
        `loss_of()` runs the forward pass and returns the (scaled) loss; returns the clean loss, detached."""
        shape_probe: dict[str, torch.Tensor] = {}

        def probe(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            delta = torch.zeros_like(output, dtype=torch.float32, requires_grad=True)
            shape_probe["delta"] = delta
            return output + delta.to(output.dtype)

        handle = self.embeddings.register_forward_hook(probe)
        try:
            clean = loss_of()
        finally:
            handle.remove()
        backward(clean)
        grad = shape_probe["delta"].grad
        if grad is None or not torch.isfinite(grad).all():
            return clean.detach()  # nothing reached the embeddings (or an overflow): the clean step stands
        if self.kind == "fgm":
            r = self.epsilon * self._unit(grad.detach())
        else:  # the clean gradient gives the first ascent step; each further one costs a forward/backward
            alpha = ALPHA_SHARE * self.epsilon / self.steps
            r = self._project(alpha * self._unit(grad.detach()))
            for _ in range(self.steps - 1):
                delta = r.clone().requires_grad_(True)
                with self._adding(delta):
                    loss = loss_of()
                (g,) = torch.autograd.grad(loss, delta)
                r = self._project(r + alpha * self._unit(g.detach()))
        with self._adding(r.detach()):
            backward(loss_of())
        return clean.detach()
