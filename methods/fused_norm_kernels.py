"""The Triton kernels of ``methods.fused_norm`` (imported only when the op first runs on CUDA or
under ``TRITON_INTERPRET=1``, so the package imports without Triton). Their algorithm, tests and
measurements: ``methods/fused_norm.py``'s docstring."""

import triton
import triton.language as tl


@triton.jit
def channel_add(cbias_ptr, sbias_ptr, n, sb_n, c, cmask, HAS_CBIAS: tl.constexpr, HAS_SBIAS: tl.constexpr):
    """channel_bias[c] + sample_bias[n, c] in fp32 (zeros where absent)."""
    add = tl.zeros(c.shape, tl.float32)
    if HAS_CBIAS:
        add += tl.load(cbias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SBIAS:
        add += tl.load(sbias_ptr + n * sb_n + c, mask=cmask, other=0.0).to(tl.float32)
    return add


@triton.jit
def group_norm_stats_kernel(x_ptr, cbias_ptr, sbias_ptr, mean_ptr, m2_ptr, C, HW, s_n, s_c, s_p, sb_n,
                            pixels_per_program, n_pblocks,
                            HAS_CBIAS: tl.constexpr, HAS_SBIAS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_pblocks
    pb = pid % n_pblocks
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    add = channel_add(cbias_ptr, sbias_ptr, n, sb_n, c, cmask, HAS_CBIAS, HAS_SBIAS)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    p_start = pb * pixels_per_program
    p_end = tl.minimum(p_start + pixels_per_program, HW)
    base = x_ptr + n.to(tl.int64) * s_n
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < p_end
        mask = pmask[:, None] & cmask[None, :]
        v = tl.load(base + p[:, None].to(tl.int64) * s_p + c[None, :] * s_c, mask=mask, other=0.0)
        v = tl.where(mask, v.to(tl.float32) + add[None, :], 0.0)
        k = tl.sum(pmask.to(tl.float32), axis=0)
        tile_mean = tl.sum(v, axis=0) / k
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + k
        delta = tile_mean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + tile_m2 + delta * delta * (count * (k / total))
        count = total
    out = (n * n_pblocks + pb) * C + c
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def group_norm_stats_shifted_kernel(x_ptr, cbias_ptr, sbias_ptr, mean_ptr, m2_ptr, C, HW, s_n, s_c, s_p,
                                    sb_n, pixels_per_program, n_pblocks,
                                    HAS_CBIAS: tl.constexpr, HAS_SBIAS: tl.constexpr,
                                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_pblocks
    pb = pid % n_pblocks
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    p_start = pb * pixels_per_program
    p_end = tl.minimum(p_start + pixels_per_program, HW)
    base = x_ptr + n.to(tl.int64) * s_n
    # x + add - (x[first] + add) = x - x[first]: the biases only move the mean
    shift = tl.load(base + p_start.to(tl.int64) * s_p + c * s_c, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_end)[:, None] & cmask[None, :]
        v = tl.load(base + p[:, None].to(tl.int64) * s_p + c[None, :] * s_c, mask=mask, other=0.0)
        d = tl.where(mask, v.to(tl.float32) - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    k = (p_end - p_start).to(tl.float32)
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    add = shift + channel_add(cbias_ptr, sbias_ptr, n, sb_n, c, cmask, HAS_CBIAS, HAS_SBIAS)
    out = (n * n_pblocks + pb) * C + c
    tl.store(mean_ptr + out, add + s1 / k, mask=cmask)
    tl.store(m2_ptr + out, tl.maximum(s2 - s1 * (s1 / k), 0.0), mask=cmask)


@triton.jit
def group_norm_finalize_kernel(mean_ptr, m2_ptr, weight_ptr, bias_ptr, cbias_ptr, sbias_ptr, scale_ptr,
                               shift_ptr, C, HW, G, cpg, n_pblocks, pixels_per_program, sb_n, eps,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_CBIAS: tl.constexpr, HAS_SBIAS: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK_G)
    b = tl.arange(0, BLOCK_B)
    c = g * cpg + j
    jmask = j < cpg
    bmask = b < n_pblocks
    mask = bmask[:, None] & jmask[None, :]
    index = (n * n_pblocks + b[:, None]) * C + c[None, :]
    mu = tl.load(mean_ptr + index, mask=mask, other=0.0)
    m2 = tl.load(m2_ptr + index, mask=mask, other=0.0)
    counts = tl.minimum(pixels_per_program, HW - b * pixels_per_program).to(tl.float32)
    weights = tl.where(mask, counts[:, None], 0.0)
    total = (HW * cpg) * 1.0
    group_mean = tl.sum(tl.sum(weights * mu, axis=1), axis=0) / total
    d = tl.where(mask, mu - group_mean, 0.0)
    group_m2 = tl.sum(tl.sum(m2 + weights * d * d, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(group_m2 / total + eps)
    scale = tl.full([BLOCK_G], 1.0, tl.float32) * rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=jmask, other=0.0).to(tl.float32)
    add = channel_add(cbias_ptr, sbias_ptr, n, sb_n, c, jmask, HAS_CBIAS, HAS_SBIAS)
    shift = (add - group_mean) * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + c, mask=jmask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + n * C + c, scale, mask=jmask)
    tl.store(shift_ptr + n * C + c, shift, mask=jmask)


@triton.jit
def group_norm_apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, C, HW, n_pblocks, s_n, s_c, s_p, y_n, y_c,
                            y_p, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // n_pblocks
    pb = pid % n_pblocks
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    scale = tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0)
    p64 = p[:, None].to(tl.int64)
    v = tl.load(x_ptr + n.to(tl.int64) * s_n + p64 * s_p + c[None, :] * s_c, mask=mask, other=0.0)
    y = v.to(tl.float32) * scale[None, :] + shift[None, :]
    if ACT == 1:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + n.to(tl.int64) * y_n + p64 * y_p + c[None, :] * y_c,
             y.to(y_ptr.dtype.element_ty), mask=mask)
