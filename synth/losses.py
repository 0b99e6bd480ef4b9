"""Synthesis loss terms, each small and exact; methods sum them with weights."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 when it is in a half-precision type (autocast), else as it is (fp32 or fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


_ALL, _HEAD, _TAIL = slice(None), slice(None, -1), slice(1, None)
_PAIRS = (((_ALL, _HEAD), (_ALL, _TAIL)),    # (minuend, subtrahend) index over (H, W): width,
          ((_HEAD, _ALL), (_TAIL, _ALL)),    # height,
          ((_TAIL, _HEAD), (_HEAD, _TAIL)),  # anti-diagonal,
          ((_HEAD, _HEAD), (_TAIL, _TAIL)))  # diagonal


def _diffs(x: torch.Tensor) -> list[torch.Tensor]:
    """Neighbour differences along width, height and both diagonals."""
    return [x[(..., *a)] - x[(..., *b)] for a, b in _PAIRS]


# 2x2 windows (a b / c d) -> the four neighbour differences: width a-b, height a-c, anti-diagonal c-b, diagonal a-d
_TV_KERNEL = ((1.0, -1.0, 0.0, 0.0), (1.0, 0.0, -1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (1.0, 0.0, 0.0, -1.0))


@functools.lru_cache(maxsize=16)
def _tv_operator(h: int, w: int, weight: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The difference kernel (4x1x2x2, times weight) and the mask (1x4x(h+1)x(w+1)) of the windows, zero-padded
    by one pixel, whose pair of pixels both lie in the image (each difference exactly once); made once per size."""
    kernel = (torch.tensor(_TV_KERNEL, dtype=torch.float64) * weight).to(dtype=dtype, device=device).view(4, 1, 2, 2)
    mask = torch.zeros(1, 4, h + 1, w + 1, dtype=dtype, device=device)
    # output (i, j) sees pixels rows i-1..i, columns j-1..j
    mask[0, 0, 1:h + 1, 1:w] = 1  # width: one row, two columns
    mask[0, 1, 1:h, 1:w + 1] = 1  # height: two rows, one column
    mask[0, 2:, 1:h, 1:w] = 1  # both diagonals: two rows and two columns
    return kernel, mask


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in full fp32 (no TF32) for the duration; the user's setting restored after."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9's per-operator setting
        saved, conv.fp32_precision = conv.fp32_precision, "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
        return
    saved, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def tv_by_convolution(device: torch.device) -> bool:
    """Which form of tv_l2 runs on this device (a function, so tests run the CUDA form on the CPU)."""
    return device.type == "cuda"


class _TotalVariationL2(torch.autograd.Function):
    """tv_l2 with a hand-written backward, in one of two forms chosen by the device (the same value and gradient):

    - CUDA: one convolution. The four difference maps of every channel are a 2x2 convolution of the zero-padded
      image, masked to the windows inside it; backward is the transposed convolution: 11 dispatched ops
      forward and backward whatever the image size, in the image's own precision (no autocast, no TF32).
    - CPU: slices. Convolutions of one channel into four are 4-10x slower there than the slices (12.5 against
      1.2 ms at 256x1x28x28, forward and backward), so each map is a difference of two views, and backward
      adds each map back through the same views (~39 ops).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float, groups: int) -> torch.Tensor:
        n, c, h, w = x.shape
        ctx.shape, ctx.conv, ctx.groups = x.shape, tv_by_convolution(x.device), groups
        if ctx.conv:
            kernel, mask = _tv_operator(h, w, weight, x.dtype, x.device)  # the weight scales the kernel
            with torch.autocast(x.device.type, enabled=False), _exact_fp32(x.device):
                diffs = F.conv2d(x.reshape(n * c, 1, h, w), kernel, padding=1) * mask
            # map by map, then over the batch: one norm over (0, 2, 3) at once loses ~1e-4 of it on CPU
            per_map = torch.linalg.vector_norm(diffs, dim=(2, 3), keepdim=True)
            norms = (torch.linalg.vector_norm(per_map, dim=0, keepdim=True) if groups == 1 else  # each group's own
                     torch.linalg.vector_norm(per_map.view(groups, -1, 4, 1, 1), dim=1, keepdim=True))
            ctx.save_for_backward(norms, diffs, kernel)
            return norms.sum()
        diffs = _diffs(x)
        norms = torch.stack([torch.linalg.vector_norm(d) if groups == 1 else
                             torch.linalg.vector_norm(d.reshape(groups, -1), dim=1) for d in diffs])
        ctx.weight = weight
        ctx.save_for_backward(norms, *diffs)
        return norms.sum() * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        norms, *saved = ctx.saved_tensors
        groups = ctx.groups
        if ctx.conv:
            diffs, kernel = saved
            scales = g / norms.clamp_min(torch.finfo(norms.dtype).tiny)  # a zero map has zero differences: no NaN
            scaled = diffs * scales if groups == 1 else (diffs.view(groups, -1, *diffs.shape[1:]) * scales).flatten(0, 1)
            with _exact_fp32(diffs.device):
                grad = F.conv_transpose2d(scaled, kernel, padding=1)
            return grad.view(ctx.shape), None, None
        scales = (g * ctx.weight / norms.clamp_min(torch.finfo(norms.dtype).tiny)).unbind()
        grad = saved[0].new_zeros(ctx.shape)
        for (a, b), d, s in zip(_PAIRS, saved, scales):
            if groups > 1:  # each group's differences by its own scale
                d = (d.view(groups, -1) * s.view(groups, 1)).view(d.shape)
                grad[(..., *a)].add_(d)
                grad[(..., *b)].sub_(d)
            else:
                grad[(..., *a)].addcmul_(d, s)
                grad[(..., *b)].addcmul_(d, s, value=-1)
        return grad, None, None


def tv_l2(x: torch.Tensor, weight: float = 1.0, groups: int = 1) -> torch.Tensor:
    """Total variation, L2 form: weight (>= 0) x the sum of the norms of the four neighbour-difference maps; with
    `groups` G, the sum over G equal groups of images of each group's own."""
    if weight < 0:
        raise ValueError(f"tv_l2's weight must be >= 0, got {weight}")
    return _TotalVariationL2.apply(x, float(weight), int(groups))


def tv_l1(x: torch.Tensor) -> torch.Tensor:
    """Total variation, L1 form: sum of the mean absolute neighbour differences."""
    return sum(d.abs().mean() for d in _diffs(x))


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Image norm ||x||_2 (keeps pixel energy bounded)."""
    return torch.linalg.vector_norm(x)


class _Competition(torch.autograd.Function):
    """competition() with a hand-written backward: both softmaxes stacked, the clamps' pass-through masks
    taken in the forward; 26 dispatched ops forward and backward where autograd's graph of the formula was ~90."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float, groups: int) -> torch.Tensor:
        probs = torch.softmax(torch.stack([at_least_fp32(s), at_least_fp32(t)]) / temperature, dim=-1)  # student, teacher
        clamped = probs.clamp(0.01, 0.99)
        mix = probs.mean(0)
        mix_c = mix.clamp(0.01, 0.99)
        log_mix = mix_c.log()
        d = log_mix.mul(2).sub_(clamped.log().sum(0))  # sum over both of log m - log p
        scale = 0.5 * groups / s.shape[0]  # the mean of the two KLs, each averaged over the (group's) batch
        terms = mix_c * d
        js = terms.sum() * scale if groups == 1 else terms.view(groups, -1).sum(1) * scale  # each group its own
        js_c = js.clamp(0.0, 1.0)
        # d loss / d (stacked logits / T) = -scale * [js in range] * (0.5 [m in range] (d + 2) - [p in range] m / p)
        ctx.save_for_backward(probs, clamped, clamped == probs, mix_c, (mix_c == mix).float().mul_(0.5), d,
                              (js_c == js).float().mul_(-scale / temperature))
        ctx.dtypes, ctx.groups = (s.dtype, t.dtype), groups
        return 1.0 - js_c if groups == 1 else (1.0 - js_c).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        probs, clamped, in_p, mix_c, half_in_m, d, outer = ctx.saved_tensors
        g_probs = (d + 2).mul_(half_in_m) - torch.div(mix_c, clamped).mul_(in_p)
        if ctx.groups == 1:
            g_probs.mul_(outer * g)
        else:
            g_probs.view(2, ctx.groups, -1).mul_((outer * g).view(1, -1, 1))
        g_z = torch._softmax_backward_data(g_probs, probs, -1, probs.dtype)
        g_s, g_t = g_z.unbind(0)
        return g_s.to(ctx.dtypes[0]), g_t.to(ctx.dtypes[1]), None, None


def competition(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0,
                groups: int = 1) -> torch.Tensor:
    """ADI's term: 1 - Jensen-Shannon(teacher, student) at T, probabilities clamped to [0.01, 0.99] as published;
    with `groups` G, the sum over G equal groups of samples of each group's own.

    Minimizing it pushes images toward where the student disagrees with the teacher.
    """
    return _Competition.apply(student_logits, teacher_logits, float(temperature), int(groups))


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


def agreement_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of per-sample KL(teacher || student) counted only where both pick the same class (0 elsewhere).

    The adversarial term of Fast and NAYER (their "decision adversarial distillation"): the generator maximizes
    it, so it seeks samples the student gets wrong in its soft outputs without pushing across the teacher's
    decision boundary, which would only make samples the teacher itself is unsure of.
    """
    s, t = student_logits.float(), teacher_logits.float()
    per_sample = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="none", log_target=True).sum(1)
    agree = (s.argmax(1) == t.argmax(1)).float()
    return (per_sample * agree).mean()


def attention(f: torch.Tensor) -> torch.Tensor:
    """Attention map of a feature map (Zagoruyko & Komodakis): channel-mean of squares, flattened, unit norm."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature T, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.float() / temperature, 1), reduction="batchmean")
