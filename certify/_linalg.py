"""Certified operator norms: explicit matrices, convolutions (FFT on a circular embedding), pooling operators.

Every function here returns an UPPER bound on an operator norm that is exact up to floating-point rounding, and the
rounding is covered by an explicit slack (a relative few 1e-10 at the sizes used). Nothing here is an unconverged
power iteration: estimates from Lanczos are only used to *choose* a candidate that a Cholesky factorisation then
certifies.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["spectral_norm", "lmax_psd", "conv_l2_bound", "conv_linf", "conv_padding", "maxpool_factor",
           "pool_norms", "UNIT_ROUNDOFF"]

UNIT_ROUNDOFF = 2.0 ** -53          # float64
EIG_MAX_SIDE = 640                  # eigvalsh up to this side; Lanczos + Cholesky certificate above


@contextlib.contextmanager
def lapack_threads(n: int = 1):
    """Run LAPACK factorisations single-threaded: on a shared 2-core machine MKL's threaded eigvalsh/svd can be
    100x slower under contention (spin-waiting), while a single thread takes milliseconds at these sizes."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def _eigvalsh(G: torch.Tensor) -> torch.Tensor:
    with lapack_threads(1):
        return torch.linalg.eigvalsh(G)


def _gram(M: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Gram matrix of the smaller side of M (float64) and a bound on the rounding error of forming it.

    |fl(G) - G| <= n u |M||M|^T entrywise (n = inner dimension), so ||fl(G) - G||_2 <= n u ||M||_F^2."""
    m, n = M.shape
    G = M @ M.mH if m <= n else M.mH @ M
    inner = max(m, n)
    err = inner * UNIT_ROUNDOFF * float((M.abs() ** 2).sum())
    return G, err


def _lanczos_top(G: torch.Tensor, steps: int = 64, seed: int = 0) -> float:
    """Largest Ritz value of a symmetric matrix after `steps` Lanczos steps (full reorthogonalisation).

    A Ritz value is always <= lambda_max: this is an *estimate* from below, used only as a candidate to certify."""
    n = G.shape[0]
    steps = min(steps, n)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=G.dtype)
    q /= q.norm()
    Q = torch.zeros(n, steps, dtype=G.dtype)
    alpha = torch.zeros(steps, dtype=G.dtype)
    beta = torch.zeros(steps, dtype=G.dtype)
    k_used = steps
    for k in range(steps):
        Q[:, k] = q
        w = G @ q
        alpha[k] = torch.dot(q, w)
        w = w - Q[:, :k + 1] @ (Q[:, :k + 1].T @ w)
        w = w - Q[:, :k + 1] @ (Q[:, :k + 1].T @ w)
        b = w.norm()
        if k + 1 < steps:
            beta[k] = b
            if b <= 1e-300:
                k_used = k + 1
                break
            q = w / b
    T = torch.diag(alpha[:k_used]) + torch.diag(beta[:k_used - 1], 1) + torch.diag(beta[:k_used - 1], -1)
    return float(_eigvalsh(T)[-1])


def lmax_psd(G: torch.Tensor, form_err: float = 0.0) -> tuple[float, str]:
    """Certified upper bound on the largest eigenvalue of a (numerically) symmetric PSD matrix G (float64).

    Small sides: LAPACK eigvalsh (backward stable: the result is exact for G + E with ||E|| <= c n u ||G||, covered
    by the slack). Large sides: Lanczos gives a candidate theta <= lambda_max; then a Cholesky factorisation of
    c I - G with c = theta (1 + tau) is attempted; success proves c I - G + E is positive definite with
    ||E|| <= 2 (n+1)^2 u c (Demmel's backward error bound for Cholesky), hence lambda_max(G) <= c (1 + 2 (n+1)^2 u).
    tau grows until the factorisation succeeds; eigvalsh is the fallback.
    Returns (bound, method)."""
    n = G.shape[0]
    if n == 0:
        return 0.0, "empty"
    G = 0.5 * (G + G.mH)
    if n == 1:
        return float(G.real.reshape(())) + form_err, "exact"
    if n <= EIG_MAX_SIDE or G.is_complex():
        lam = float(_eigvalsh(G)[-1])
        slack = 8 * n * UNIT_ROUNDOFF * max(abs(lam), float(G.diagonal().real.abs().max()))
        return lam + slack + form_err, "exact-eig"
    theta = _lanczos_top(G)
    eye = torch.eye(n, dtype=G.dtype)
    tau = 1e-7
    while tau < 0.5:
        c = max(theta, 1e-300) * (1 + tau) + form_err
        with lapack_threads(1):
            _, info = torch.linalg.cholesky_ex(c * eye - G)
        if int(info) == 0:
            return c * (1 + 2 * (n + 1) ** 2 * UNIT_ROUNDOFF) + form_err, "lanczos+cholesky-certificate"
        tau *= 10
    lam = float(_eigvalsh(G)[-1])
    return lam + 8 * n * UNIT_ROUNDOFF * abs(lam) + form_err, "exact-eig"


def spectral_norm(M: torch.Tensor) -> tuple[float, str]:
    """Certified upper bound on ||M||_2 (largest singular value) of an explicit float64 matrix; (value, method)."""
    if M.dim() != 2:
        M = M.reshape(M.shape[0], -1)
    if M.numel() == 0:
        return 0.0, "empty"
    if min(M.shape) == 1:
        v = float(M.norm())
        return v * (1 + 4 * max(M.shape) * UNIT_ROUNDOFF), "exact-vector-norm"
    G, err = _gram(M)
    lam, method = lmax_psd(G, err)
    return math.sqrt(max(lam, 0.0)), method


# ------------------------------------------------------------------------------------------- convolutions

def conv_padding(conv, in_hw) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of an nn.Conv2d for an input of spatial size in_hw."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return 0, 0, 0, 0
        if pad == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"unknown padding {pad!r}")
    ph, pw = pad
    return ph, ph, pw, pw


def conv_l2_bound(weight: torch.Tensor, stride, pads, dilation, in_hw, max_chunk_elems: int = 2_000_000) -> float:
    """Certified upper bound on the L2 operator norm of a zero-padded 2-D convolution (cross-correlation) without
    bias, as a linear map on inputs of spatial size ``in_hw``.

    Proof sketch. Let N = H + pad_top + pad_bottom (same for width). The layer is
    ``y = S . C . P . E x``: E zero-pads x to N x N (an isometric embedding); P zero-extends to s*ceil(N/s) and
    rearranges the padded image into s^2 polyphase channels X_r[u] = X[s u + r] (a permutation, so an isometry);
    C is a stride-1 *circular* multi-channel correlation on the M x M polyphase grid (M = ceil(N/s)) with the
    polyphase kernel K'[o, (i, r), q] = K[o, i, s q + r] of size ceil(k_eff/s); S keeps the positions the strided
    layer outputs (a coordinate selection, ||S|| <= 1). For every output kept, the taps it reads satisfy
    u + q <= M - 1, so the circular wrap-around never touches them and S C P E equals the layer exactly.
    Hence ||layer|| <= ||C||. The 2-D DFT block-diagonalises a circular multi-channel correlation with unitary
    transforms, so ||C|| = max over the M x M frequency grid of sigma_max(K'^(omega)) (a c_out x c_in s^2 matrix).
    The maximum of sigma_max^2 over the grid is certified in float64/complex128 (exact eigvalsh where it is
    attained, trace or Cholesky certificates elsewhere, see ``_conv_lmax``); conjugate
    symmetry halves the grid. Dilation is handled by expanding the kernel with zeros.
    """
    W = weight.detach().to(torch.float64)
    c_out, c_in, kh, kw = W.shape
    dh, dw = dilation
    if dh > 1 or dw > 1:
        Wd = W.new_zeros(c_out, c_in, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        Wd[:, :, ::dh, ::dw] = W
        W = Wd
        kh, kw = W.shape[-2:]
    H, Wi = in_hw
    pt, pb, pl, pr = pads
    Nh, Nw = H + pt + pb, Wi + pl + pr
    sh, sw = stride
    qh, qw = -(-kh // sh), -(-kw // sw)
    Mh, Mw = -(-Nh // sh), -(-Nw // sw)
    Mh, Mw = max(Mh, qh), max(Mw, qw)
    # polyphase kernel (c_out, c_in * sh * sw, qh, qw)
    Wp = W.new_zeros(c_out, c_in, sh * qh, sw * qw)
    Wp[:, :, :kh, :kw] = W
    Wp = Wp.reshape(c_out, c_in, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * sh * sw, qh, qw)
    c_in_p = Wp.shape[1]
    if min(c_out, c_in_p) == 1:
        K, energy = _dft_half(Wp, Mh, Mw)
        lam = float(energy.max())
        return math.sqrt(lam) * (1 + 16 * (max(c_out, c_in_p) + qh * qw) * UNIT_ROUNDOFF)
    lam = _conv_lmax(Wp, Mh, Mw)
    # rounding: tap products (inner-dim u), phase sums (#offsets u), eig/Cholesky (side u); a generous slack relative
    # to taps * ||W||_F^2, which bounds every ||G(w)|| (Cauchy-Schwarz over the taps)
    side, inner = min(c_out, c_in_p), max(c_out, c_in_p)
    slack = 16 * (inner + side + 4 * qh * qw) * UNIT_ROUNDOFF
    fro = float((W ** 2).sum())
    return math.sqrt(max(lam, 0.0) + slack * qh * qw * fro)


def _conv_lmax(Wp: torch.Tensor, Mh: int, Mw: int, top: int = 8, tau: float = 1e-6,
               chunk_elems: int = 4_000_000) -> float:
    """max over the half frequency grid of lambda_max(G(w)), G(w) the smaller-side Gram of K^(w), certified.

    G(w) = sum_delta R_delta exp(-i w.delta) with the tap autocorrelations R_delta = sum_{t - t' = delta} W_t W_t'^T
    (W_t the c_out x c_in tap matrices, or their transposes for the other side), so the Grams of all frequencies
    cost (2q-1)^2 small real products plus one phase sum, instead of one complex product per frequency. Their
    traces are trigonometric sums of the scalars tr(R_delta). The largest-trace frequencies are solved exactly
    (eigvalsh), giving lam; every other frequency is certified below c = lam (1 + tau) by its trace or by a
    Cholesky factorisation of c I - G(w) (chunked), failures are solved exactly."""
    c_out, c_in, qh, qw = Wp.shape
    taps = Wp.permute(2, 3, 0, 1).reshape(qh * qw, c_out, c_in)
    if c_out > c_in:
        taps = taps.transpose(1, 2)
    n = taps.shape[1]
    ta = torch.arange(qh).repeat_interleave(qw)
    tb = torch.arange(qw).repeat(qh)
    # offsets delta in a half plane (delta and -delta give transposed R)
    offsets = [(da, db) for da in range(-(qh - 1), qh) for db in range(-(qw - 1), qw) if (da, db) > (0, 0)]
    R0 = torch.einsum("tnm,tkm->nk", taps, taps)
    Rs = []
    for da, db in offsets:
        i = [k for k in range(qh * qw) if 0 <= ta[k] - da < qh and 0 <= tb[k] - db < qw]
        j = [int((ta[k] - da) * qw + (tb[k] - db)) for k in i]
        Rs.append(torch.einsum("tnm,tkm->nk", taps[i], taps[j]))
    u = torch.arange(Mh, dtype=torch.float64)
    v = torch.arange(Mw // 2 + 1, dtype=torch.float64)
    uu = u.repeat_interleave(len(v))
    vv = v.repeat(len(u))
    if offsets:
        d = torch.tensor(offsets, dtype=torch.float64)
        phase = 2 * math.pi * (uu[:, None] * d[None, :, 0] / Mh + vv[:, None] * d[None, :, 1] / Mw)  # (F, H)
        cos, sin = torch.cos(phase), torch.sin(phase)
        R = torch.stack(Rs)                                                     # (H, n, n)
        S = (R + R.transpose(1, 2)).reshape(len(offsets), -1)
        A = (R - R.transpose(1, 2)).reshape(len(offsets), -1)
        tr_S = torch.einsum("hii->h", R) * 2
    else:
        cos = sin = S = A = tr_S = None
    nf = len(uu)
    trace = torch.full((nf,), float(torch.trace(R0)), dtype=torch.float64)
    if offsets:
        trace = trace + cos @ tr_S

    def grams(idx):
        Gr = R0.reshape(1, -1).expand(len(idx), -1).clone()
        if offsets:
            Gr += cos[idx] @ S
            Gi = -(sin[idx] @ A)
            return torch.complex(Gr, Gi).reshape(len(idx), n, n)
        return Gr.reshape(len(idx), n, n).to(torch.complex128)

    order = torch.argsort(trace, descending=True)
    first = order[:top]
    lam = float(_eigvalsh(grams(first))[:, -1].max())
    c = lam * (1 + tau)
    rest = order[top:]
    rest = rest[trace[rest] > c]
    best = lam
    if len(rest):
        best = c * (1 + 2 * (n + 1) ** 2 * UNIT_ROUNDOFF)
        eye = torch.eye(n, dtype=torch.complex128)
        step = max(1, chunk_elems // (n * n))
        for s in range(0, len(rest), step):
            idx = rest[s:s + step]
            G = grams(idx)
            with lapack_threads(1):
                _, info = torch.linalg.cholesky_ex(c * eye - G)
            bad = info != 0
            if bool(bad.any()):
                best = max(best, float(_eigvalsh(G[bad])[:, -1].max()))
    return best * (1 + 8 * n * UNIT_ROUNDOFF)


def _dft_half(Wp: torch.Tensor, Mh: int, Mw: int) -> torch.Tensor:
    """K^(u, v) = sum_{a,b} Wp[:, :, a, b] exp(-2 pi i (u a / Mh + v b / Mw)) for u < Mh, v <= Mw // 2, as a
    (F, c_out, c_in) complex128 tensor (direct sum over the few taps; real matmuls), and ||K^(u, v)||_F^2."""
    c_out, c_in, qh, qw = Wp.shape
    u = torch.arange(Mh, dtype=torch.float64)
    v = torch.arange(Mw // 2 + 1, dtype=torch.float64)
    a = torch.arange(qh, dtype=torch.float64)
    b = torch.arange(qw, dtype=torch.float64)
    theta = 2 * math.pi * ((a[:, None, None, None] * u[None, None, :, None]) / Mh
                           + (b[None, :, None, None] * v[None, None, None, :]) / Mw)   # (qh, qw, Mh, Mv)
    theta = theta.reshape(qh * qw, -1).T                                                # (F, taps)
    W2 = Wp.reshape(c_out * c_in, qh * qw).T                                             # (taps, c_out c_in)
    K = torch.empty(theta.shape[0], c_out, c_in, dtype=torch.complex128)
    Kr = torch.view_as_real(K)
    Kr[..., 0] = (torch.cos(theta) @ W2).view(-1, c_out, c_in)
    Kr[..., 1] = (torch.sin(theta) @ W2).view(-1, c_out, c_in).neg_()
    energy = (Kr ** 2).sum(dim=(1, 2, 3))
    return K, energy


def _max_lmax_batched(G: torch.Tensor, trace: torch.Tensor, top: int = 8, tau: float = 1e-6) -> float:
    """Certified upper bound on max_f lambda_max(G[f]) for a batch of Hermitian PSD matrices (lower triangles
    are read) with known traces.

    Exact eigvalsh on the `top` matrices with the largest trace gives lam (a lower estimate of the max). Every
    other matrix either has trace <= c := lam (1 + tau) (then lambda_max <= trace <= c), or passes a Cholesky
    factorisation of c I - G (then lambda_max < c up to the Cholesky backward error, covered by the slack), or
    fails it and is then solved exactly with eigvalsh. The result is max(c, exact values) (with slack)."""
    nf, n, _ = G.shape
    fro = trace
    if nf <= top:
        return float(_eigvalsh(G)[:, -1].max()) * (1 + 8 * n * UNIT_ROUNDOFF)
    idx = torch.argsort(fro, descending=True)
    exact = _eigvalsh(G[idx[:top]])[:, -1]
    lam = float(exact.max())
    c = lam * (1 + tau)
    rest = idx[top:]
    rest = rest[fro[rest] > c]
    best = lam
    if len(rest):
        eye = torch.eye(n, dtype=G.dtype)
        with lapack_threads(1):
            _, info = torch.linalg.cholesky_ex(c * eye - G[rest])
        failed = rest[info != 0]
        best = c * (1 + 2 * (n + 1) ** 2 * UNIT_ROUNDOFF)
        if len(failed):
            best = max(best, float(_eigvalsh(G[failed])[:, -1].max()))
    return best * (1 + 8 * n * UNIT_ROUNDOFF)


def conv_linf(weight: torch.Tensor, stride, pads, dilation, in_shape) -> float:
    """Exact ||.||_{inf->inf} of the zero-padded conv (no bias): the largest absolute row sum, i.e. the maximum over
    output positions of the sum of |taps| that land inside the input: conv of |K| applied to an all-ones image."""
    W = weight.detach().to(torch.float64).abs()
    pt, pb, pl, pr = pads
    ones = torch.ones(1, *in_shape, dtype=torch.float64)
    ones = F.pad(ones, (pl, pr, pt, pb))
    out = F.conv2d(ones, W, None, stride=stride, padding=0, dilation=dilation)
    return float(out.max()) * (1 + 4 * W[0].numel() * UNIT_ROUNDOFF) if out.numel() else 0.0


def maxpool_factor(pool) -> float:
    """L2 Lipschitz constant bound of nn.MaxPool2d: sqrt(ceil(k_h,eff/s_h) * ceil(k_w,eff/s_w)).

    Each output is the max over its window and |max a - max b| <= max |a - b| <= ||a - b||_2 over the window; summing
    squares over windows counts every input at most (number of windows covering it) <= ceil(k_eff/s) per axis."""
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    kh, kw = pair(pool.kernel_size)
    sh, sw = pair(pool.stride if pool.stride is not None else pool.kernel_size)
    dh, dw = pair(pool.dilation)
    keh, kew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    return math.sqrt(math.ceil(keh / sh) * math.ceil(kew / sw))


def pool_norms(module, in_shape, max_side: int = 4096) -> tuple[float, float, str]:
    """(L2 bound, Linf norm, method) of an average-pooling module acting on (C, H, W).

    The pooling acts on every channel independently with the same operator A (HW -> H'W'), so the norm of the
    layer equals the norm of A. Small images: A is built explicitly from the basis images and its norm is exact.
    Large: Schur's test ||A||_2 <= sqrt(||A||_1 ||A||_inf) with the exact row/column sums (A has non-negative
    weights, so row sums = A(1) and column sums = A^T(1))."""
    C, H, W = in_shape
    n = H * W
    if n <= max_side:
        basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, H, W)
        with torch.no_grad():
            out = module(basis).reshape(n, -1)              # row i = A e_i, i.e. out = A^T
        A = out.T
        l2, method = spectral_norm(A)
        linf = float(A.abs().sum(dim=1).max()) if A.numel() else 0.0
        return l2, linf, "pool-explicit-" + method
    x = torch.ones(1, 1, H, W, dtype=torch.float64, requires_grad=True)
    y = module(x)
    row = float(y.detach().abs().max())
    (g,) = torch.autograd.grad(y.sum(), x)
    col = float(g.abs().max())
    return math.sqrt(row * col) * (1 + 1e-12), row * (1 + 1e-12), "pool-schur-test"
