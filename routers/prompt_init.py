"""Training-free router initialisation from prompts.

Every function returns router weights `[num_experts, hidden]` for one layer, from the states the
router really sees there: the MLP input (after the post-attention norm) of each prompt's tokens.
A `TokenSet` holds one batch of such states with its padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSet:
    states: torch.Tensor  # [B, T, H]
    mask: torch.Tensor  # [B, T], 1 for real tokens

    def prompt_means(self) -> torch.Tensor:
        """Mean over each prompt's real tokens, padding excluded: [B, H]."""
        m = self.mask.unsqueeze(-1).to(self.states.dtype)
        return (self.states * m).sum(1) / m.sum(1).clamp(min=1)

    def last_tokens(self) -> torch.Tensor:
        """Each prompt's last real token (right padding): [B, H]."""
        last = self.mask.sum(1).long() - 1
        return self.states[torch.arange(len(last)), last]

    def tokens(self) -> torch.Tensor:
        """Every real token: [N, H]."""
        return self.states[self.mask.bool()]


def direction_rows(positive: list[torch.Tensor], negative: list[torch.Tensor | None]) -> torch.Tensor:
    """One row per expert: mean positive minus mean negative, centred across experts, orthogonal to
    the grand mean, unit length.

    Post-norm states share a large common component c. A router has no bias, so a row w meets
    w·c on every token; unless w is orthogonal to c, that term swamps the small per-expert part.
    Centring and projecting out the grand-mean direction removes it.
    """
    means = torch.stack([p.mean(0) for p in positive])
    rows = means - torch.stack(
        [n.mean(0) if n is not None and len(n) else torch.zeros_like(means[0]) for n in negative]
    )
    if len(rows) > 1:
        rows = rows - rows.mean(0, keepdim=True)
        shared = torch.nn.functional.normalize(means.mean(0), dim=0)
        rows = rows - (rows @ shared)[:, None] * shared
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def hidden(positive: list[TokenSet], negative: list[TokenSet | None]) -> torch.Tensor:
    """Masked mean of each prompt's MLP inputs."""
    return direction_rows([s.prompt_means() for s in positive], [n.prompt_means() if n else None for n in negative])


def hidden_last(positive: list[TokenSet], negative: list[TokenSet | None]) -> torch.Tensor:
    """The last real token's MLP input of each prompt."""
    return direction_rows([s.last_tokens() for s in positive], [n.last_tokens() if n else None for n in negative])


def fit(examples: list[TokenSet], ridge: float = 0.1) -> torch.Tensor:
    """Ridge least squares from token states to centred one-hot expert labels, in closed form.

    No intercept: the router has none, and the large component every state shares plays its part.
    `ridge` is relative to the mean feature variance, so it does not depend on the hidden scale.
    """
    x = torch.cat([s.tokens() for s in examples]).double()  # [N, H]
    labels = torch.cat([torch.full((len(s.tokens()),), e) for e, s in enumerate(examples)])
    num_experts = len(examples)
    y = torch.nn.functional.one_hot(labels, num_experts).double() - 1.0 / num_experts  # [N, E]
    gram = x.T @ x / len(x)
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ y / len(x))  # [H, E]
    return w.T.float()


def lda(
    positive: list[torch.Tensor], negative: list[torch.Tensor | None], ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant from pooled prompt representations ([n_e, H] per expert): weight [E, H], bias [E].

    Class means whitened by the shared within-class covariance (ridge-regularised, `ridge` relative to
    its mean variance); the bias makes it the nearest-mean classifier in that metric. Pooled prompts of
    one task still differ in their content words; whitening discounts exactly those directions, which
    the centred-direction rows of `hidden` cannot. Negative prompts move their expert's mean away from them.
    """
    pos = [p.double() for p in positive]
    means = torch.stack([p.mean(0) for p in pos])  # [E, H]
    grand = means.mean(0)
    for e, n in enumerate(negative):
        if n is not None and len(n):
            means[e] = means[e] - n.double().mean(0) + grand
    centred = torch.cat([p - p.mean(0) for p in pos])
    cov = centred.T @ centred / max(len(centred), 1)
    reg = ridge * cov.diagonal().mean().clamp(min=1e-12) + 1e-12
    weight = torch.linalg.solve(cov + reg * torch.eye(len(cov), dtype=cov.dtype), (means - grand).T).T  # [E, H]
    bias = -(weight * (means + grand)).sum(1) / 2  # nearest whitened mean, relative to the grand mean
    return weight.float(), bias.float()


def cheap_embed(positive_embeds: list[torch.Tensor], negative_embeds: list[torch.Tensor | None]) -> torch.Tensor:
    """Token embeddings averaged per prompt (`[B, H]` each); the same rows serve every layer."""
    return direction_rows(positive_embeds, negative_embeds)


def random(num_experts: int, hidden_size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(num_experts, hidden_size, generator=generator) * std


def uniform(num_experts: int, hidden_size: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, U(-1/sqrt(H), 1/sqrt(H)), as mergekit's `uniform_random`."""
    bound = hidden_size**-0.5
    return (torch.rand(num_experts, hidden_size, generator=generator) * 2 - 1) * bound


def calibrate(
    weight: torch.Tensor, states: torch.Tensor, target: float, iters: int = 60, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Scale `weight` (and the caller scales `bias` alike) so the mean top softmax probability over
    `states` ([N, H]) equals `target`.

    The mean top probability grows with the scale, so bisection on log-scale finds it. Without
    this, raw prompt directions give logits whose spread is set by the hidden-state norm: routing
    ends up flat or one-hot by accident.
    """
    logits = states.float() @ weight.float().T  # [N, E]
    if bias is not None:
        logits = logits + bias.float()

    def confidence(log_s: float) -> float:
        return torch.softmax(logits * torch.e**log_s, dim=-1).max(-1).values.mean().item()

    lo, hi = -20.0, 20.0
    if confidence(hi) < target:
        return weight * torch.e**hi, torch.e**hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if confidence(mid) < target else (lo, mid)
    scale = torch.e ** ((lo + hi) / 2)
    return weight * scale, scale
