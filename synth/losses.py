"""Synthesis loss terms, each small and exact; methods sum them with weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChannelMoments(torch.autograd.Function):
    """Per-channel (mean, biased variance) in one pass, with a one-kernel backward.

    Forward: sums of x and x² (on CPU 5-6x faster than torch.var_mean's Welford pass; fp32 sums of
    activations lose precision only when |mean| >> std, far from what feature maps show). Backward:
    d/dx = gm/n + 2 gv (x - mu)/n as one fused multiply-add per element, where autograd's own mean +
    var graph makes several passes and temporaries.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        mean = x.sum(dims) / n
        var = ((x * x).sum(dims) / n - mean * mean).clamp_min(0)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor | None, g_var: torch.Tensor | None) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        scale = 2.0 * g_var / n
        shift = g_mean / n - scale * mean
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance in fp32 (N×C, N×C×L or N×C×H×W; channels on dim 1)."""
    return _ChannelMoments.apply(x if x.dtype in (torch.float32, torch.float64) else x.float())


def stat_loss(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's feature-distribution term: ||mu(x) - mean||_2 + ||var(x) - var||_2."""
    mu, v = channel_stats(x)
    return torch.linalg.vector_norm(mu - mean.float()) + torch.linalg.vector_norm(v - var.float())


def _diffs(x: torch.Tensor) -> list[torch.Tensor]:
    """Neighbour differences along width, height and both diagonals."""
    return [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
            x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """Total variation, L2 form: sum of the norms of the four neighbour-difference maps."""
    return sum(torch.linalg.vector_norm(d) for d in _diffs(x))


def tv_l1(x: torch.Tensor) -> torch.Tensor:
    """Total variation, L1 form: sum of the mean absolute neighbour differences."""
    return sum(d.abs().mean() for d in _diffs(x))


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Image norm ||x||_2 (keeps pixel energy bounded)."""
    return torch.linalg.vector_norm(x)


def competition(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """ADI's term: 1 - Jensen-Shannon(teacher, student) at T, probabilities clamped to [0.01, 0.99] as published.

    Minimizing it pushes images toward where the student disagrees with the teacher.
    """
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    kl = lambda a: F.kl_div(torch.log(a), m, reduction="batchmean")
    return 1.0 - (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def amplitudes(x: torch.Tensor) -> torch.Tensor:
    """Per-sample amplitude spectra: 2-D FFT per channel for maps, 1-D for vectors (fp32)."""
    x = x.float()
    spec = torch.fft.rfft2(x, norm="ortho") if x.dim() == 4 else torch.fft.rfft(x.flatten(2) if x.dim() == 3 else x, norm="ortho")
    return spec.abs()


def amplitude(x: torch.Tensor) -> torch.Tensor:
    """Mean amplitude spectrum over the batch."""
    return amplitudes(x).mean(0)


def class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of per-sample values (K×...) and per-class counts, by index_add (no host sync on CUDA)."""
    sums = values.new_zeros((num_classes, *values.shape[1:])).index_add_(0, labels, values)
    counts = values.new_zeros(num_classes).index_add_(0, labels, values.new_ones(len(labels)))
    return sums, counts


def spectral_loss(x: torch.Tensor, ref_amplitude: torch.Tensor) -> torch.Tensor:
    """Relative L2 distance between the batch's mean amplitude spectrum and a recorded one (0 when equal)."""
    a = amplitude(x)
    ref = ref_amplitude.float().to(a.device)
    return torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)


def class_spectral_loss(x: torch.Tensor, labels: torch.Tensor, ref_class_amplitude: torch.Tensor) -> torch.Tensor:
    """spectral_loss per class (each class's samples against its recorded K×spectrum row), averaged over the
    classes present in the batch."""
    ref = ref_class_amplitude.float().to(x.device)
    sums, counts = class_sums(amplitudes(x), labels, ref.shape[0])
    mean = sums / counts.clamp_min(1).view(-1, *([1] * (sums.dim() - 1)))
    dist = torch.linalg.vector_norm((mean - ref).flatten(1), dim=1) / \
        torch.linalg.vector_norm(ref.flatten(1), dim=1).clamp_min(1e-12)
    present = (counts > 0).to(dist.dtype)
    return (dist * present).sum() / present.sum().clamp_min(1)
