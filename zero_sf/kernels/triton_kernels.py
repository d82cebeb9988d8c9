"""Triton kernels.  The math lives in the ``_*_math`` helpers, written to
mirror :mod:`zero_sf.spec` line by line; the ``_flat_*`` kernels run it over
one contiguous tensor (a shard), the ``_multi_*`` kernels over a chunk table
of many tensors in one launch (the single-device optimizer's small params).

Traffic per element of one SF-AdamW step, bf16 model with fp32 master:
read g(2) y(4) z(4) v(4) = 14 B, write y(4) z(4) v(4) y_out(2) = 14 B,
28 B in all -- the same as torch's fused AdamW (docs/design.md §4).
"""

import triton
import triton.language as tl


@triton.jit
def _round(x, ptr):
    """x (fp32) rounded to ptr's element type, to nearest even.

    bf16 is rounded by hand on the bits: under TRITON_INTERPRET=1 Triton's
    own fp32->bf16 cast truncates (docs/design.md §4), which would leave CPU
    results up to 1 ulp off torch's ``.bfloat16()``; this way the kernel is
    bit-exact against torch everywhere, for ~4 integer ops per element of a
    memory-bound kernel."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        r = tl.where(x != x, x.to(tl.bfloat16), r)  # keep NaN a NaN
    else:
        r = x.to(ptr.dtype.element_ty)
    return r


@triton.jit
def _mix32(x):
    # Wellons' lowbias32 on uint32 (wrapping), as storage.mix32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _index(offs, base_lo, base_hi):
    """Global element indices (int64): the base arrives as two i32 halves so
    that its value never changes the kernel's signature."""
    base = (base_hi.to(tl.int64) << 32) | base_lo.to(tl.uint32, bitcast=True).to(tl.int64)
    return base + offs


@triton.jit
def _rand(idx, key):
    """32 random bits per element (storage.random_bits): mix32(mix32(lo32(idx)
    ^ key) ^ hi32(idx)); each state lane takes 16 of them."""
    k = key.to(tl.uint32, bitcast=True)
    return _mix32(_mix32(idx.to(tl.uint32) ^ k) ^ (idx >> 32).to(tl.uint32))


@triton.jit
def _store_sr(ptr, offs, x, mask, r16):
    """x (fp32) into a bf16 ptr with stochastic rounding (storage.round_stochastic):
    16 random bits added to the dropped bits, then truncated; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    out = ((bits + r16) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    out = tl.where(x != x, _round(x, ptr), out)
    tl.store(ptr + offs, out, mask=mask)


@triton.jit
def _store_state(ptr, offs, x, mask, r, HIGH: tl.constexpr, SR: tl.constexpr):
    """A state tensor back: stochastically rounded with the low or HIGH half
    of the random words r (its lane), or to nearest (and fp32 as is)."""
    if SR:
        if HIGH:
            _store_sr(ptr, offs, x, mask, r >> 16)
        else:
            _store_sr(ptr, offs, x, mask, r & 0xFFFF)
    else:
        _store(ptr, offs, x, mask)


@triton.jit
def _load_y(ptr, rem_ptr, offs, mask, HAS_REM: tl.constexpr):
    """The exact fp32 y of a bf16 parameter and its int16 remainder
    (storage.join_master), or the parameter widened."""
    if HAS_REM:
        if mask is None:
            p = tl.load(ptr + offs)
            r = tl.load(rem_ptr + offs)
        else:
            p = tl.load(ptr + offs, mask=mask, other=0.0)
            r = tl.load(rem_ptr + offs, mask=mask, other=0)
        lo = r.to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = p.to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = (hi - (lo >> 15)) & 0xFFFF
        y = ((hi << 16) | lo).to(tl.float32, bitcast=True)
    else:
        y = _load(ptr, offs, mask)
    return y


@triton.jit
def _store_y(ptr, rem_ptr, offs, y, mask, HAS_REM: tl.constexpr):
    """y back: split into bf16 parameter + int16 remainder (storage.split_master)."""
    if HAS_REM:
        bits = y.to(tl.uint32, bitcast=True)
        lo = bits & 0xFFFF
        hi = ((bits >> 16) + (lo >> 15)) & 0xFFFF
        tl.store(ptr + offs, hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(rem_ptr + offs, lo.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        _store(ptr, offs, y, mask)


@triton.jit
def _load(ptr, offs, mask):
    # mask None: a full chunk, no predication (lets the loads vectorize).
    if mask is None:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, mask):
    tl.store(ptr + offs, _round(x, ptr), mask=mask)


@triton.jit
def _lerp(a, b, w):
    # torch.lerp's formula, so kernel and spec round alike: the weight is a
    # host scalar, the branch is uniform across the block.
    if w < 0.5:
        out = a + w * (b - a)
    else:
        out = b - (b - a) * (1.0 - w)
    return out


@triton.jit
def _sf_adamw_math(g, y, z, v, lr, ck, y_coef, beta2, bias_correction2, eps,
                   weight_decay, grad_scale, HAS_WD: tl.constexpr):
    g = g * grad_scale
    # v <- b2 v + (1-b2) g^2 ;  u = g / (sqrt(v / bc2) + eps)
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
    u = tl.div_rn(g, denom)
    if HAS_WD:
        u = u + weight_decay * y  # decay evaluated at y
    # y <- (1-ck) y + ck z + lr (b1 (1-ck) - 1) u ;  z <- z - lr u
    y = _lerp(y, z, ck)
    y = y + y_coef * u
    z = z - lr * u
    return y, z, v


@triton.jit
def _rmsprop_math(g, p, v, buf, gavg, lr, alpha, eps, weight_decay,
                  bias_correction2, momentum, grad_scale,
                  HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                  EPS_IN_SQRT: tl.constexpr, BIAS_CORRECTION: tl.constexpr):
    g = g * grad_scale
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * p  # coupled L2, as torch.optim.RMSprop
    v = alpha * v + (1.0 - alpha) * g * g
    avg = v
    if CENTERED:
        gavg = _lerp(gavg, g, 1.0 - alpha)
        avg = v - gavg * gavg
    if BIAS_CORRECTION:
        avg = tl.div_rn(avg, bias_correction2)
    if EPS_IN_SQRT:
        avg = tl.sqrt_rn(avg + eps)
    else:
        avg = tl.sqrt_rn(avg) + eps
    if MOMENTUM:
        buf = momentum * buf + tl.div_rn(g, avg)
        p = p - lr * buf
    else:
        p = p - lr * tl.div_rn(g, avg)
    return p, v, buf, gavg


@triton.jit
def _flat_offsets(n, BLOCK: tl.constexpr):
    # int64 offsets: a 1B-element shard times 4 B overflows int32 addressing.
    # full: the block lies inside the tensor, so it runs unmasked and its
    # loads vectorize even when n is not a multiple of 16.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n, (pid + 1) * BLOCK <= n


@triton.jit
def _chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, BLOCK: tl.constexpr):
    """Chunk c of the table: its tensor t, offsets and mask."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.multiple_of(tl.load(chunk_start_ptr + c), BLOCK)  # chunks start at k * BLOCK
    n = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < n


@triton.jit
def _ptr(table_ptr, t, like_ptr, FULL: tl.constexpr):
    """Pointer table entry t, typed like like_ptr (all tensors of one launch
    share a dtype per role).

    FULL launches get only whole BLOCKs of tensors whose pointers are all
    16-byte aligned (the host sorts the chunks, launch._chunk_table): there
    the alignment hint is true and the unmasked accesses compile to 128-bit
    loads/stores.  A mask on a numel read at run time cannot vectorize (24
    scalar LDG.E per thread before, issue #10), so the ragged tails and
    unaligned tensors take a second, masked launch.  Two kernels rather than
    a branch in one: ``tl.multiple_of`` annotates the op that defined the
    pointer, so a hint inside one branch would hold in both."""
    p = tl.load(table_ptr + t).to(like_ptr.dtype)
    if FULL:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _sf_adamw_body(y_ptr, g_ptr, z_ptr, v_ptr, yout_ptr, offs, mask,
                   lr, ck, y_coef, beta2, bias_correction2, eps, weight_decay,
                   grad_scale, HAS_WD: tl.constexpr, HAS_YOUT: tl.constexpr,
                   rem_ptr=None, idx=None, key=None,
                   HAS_REM: tl.constexpr = False, SR: tl.constexpr = False):
    g = _load(g_ptr, offs, mask)
    y = _load_y(y_ptr, rem_ptr, offs, mask, HAS_REM)
    z = _load(z_ptr, offs, mask)
    v = _load(v_ptr, offs, mask)
    y, z, v = _sf_adamw_math(g, y, z, v, lr, ck, y_coef, beta2, bias_correction2,
                             eps, weight_decay, grad_scale, HAS_WD)
    _store_y(y_ptr, rem_ptr, offs, y, mask, HAS_REM)
    r = idx  # placeholder when SR is off (never used)
    if SR:
        r = _rand(idx, key)  # one word: z takes its low half, v its high half
    _store_state(z_ptr, offs, z, mask, r, False, SR)
    _store_state(v_ptr, offs, v, mask, r, True, SR)
    if HAS_YOUT:
        _store(yout_ptr, offs, y, mask)


# The counter's base and the rounding keys are i32 arguments that are never
# specialized: their values change every step and must not compile variants.
_COUNTERS = ["base_lo", "base_hi", "key_a", "key_b"]


@triton.jit(do_not_specialize=_COUNTERS)
def sf_adamw_flat_kernel(y_ptr, g_ptr, z_ptr, v_ptr, yout_ptr, rem_ptr, n,
                         lr, ck, y_coef, beta2, bias_correction2, eps,
                         weight_decay, grad_scale, base_lo, base_hi, key_a, key_b,
                         HAS_WD: tl.constexpr, HAS_YOUT: tl.constexpr,
                         HAS_REM: tl.constexpr, SR: tl.constexpr,
                         BLOCK: tl.constexpr):
    # key_a: random stream 0 (z: low half, v: high half); key_b unused
    offs, mask, full = _flat_offsets(n, BLOCK)
    idx = _index(offs, base_lo, base_hi)
    if full:
        _sf_adamw_body(y_ptr, g_ptr, z_ptr, v_ptr, yout_ptr, offs, None,
                       lr, ck, y_coef, beta2, bias_correction2, eps, weight_decay,
                       grad_scale, HAS_WD, HAS_YOUT, rem_ptr, idx, key_a, HAS_REM, SR)
    else:
        _sf_adamw_body(y_ptr, g_ptr, z_ptr, v_ptr, yout_ptr, offs, mask,
                       lr, ck, y_coef, beta2, bias_correction2, eps, weight_decay,
                       grad_scale, HAS_WD, HAS_YOUT, rem_ptr, idx, key_a, HAS_REM, SR)


@triton.jit
def sf_adamw_multi_kernel(y_tab, g_tab, z_tab, v_tab, yout_tab,
                          y_like, g_like, z_like, v_like, yout_like,
                          chunk_tensor_ptr, chunk_start_ptr, numel_ptr,
                          lr, ck, y_coef, beta2, bias_correction2, eps,
                          weight_decay, grad_scale,
                          HAS_WD: tl.constexpr, HAS_YOUT: tl.constexpr,
                          FULL: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = _chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, BLOCK)
    if FULL:
        mask = None
    yout_ptr = yout_like
    if HAS_YOUT:
        yout_ptr = _ptr(yout_tab, t, yout_like, FULL)
    _sf_adamw_body(_ptr(y_tab, t, y_like, FULL), _ptr(g_tab, t, g_like, FULL),
                   _ptr(z_tab, t, z_like, FULL), _ptr(v_tab, t, v_like, FULL), yout_ptr,
                   offs, mask, lr, ck, y_coef, beta2, bias_correction2, eps,
                   weight_decay, grad_scale, HAS_WD, HAS_YOUT)


@triton.jit
def _rmsprop_body(p_ptr, g_ptr, v_ptr, buf_ptr, gavg_ptr, pout_ptr, offs, mask,
                  lr, alpha, eps, weight_decay, bias_correction2, momentum,
                  grad_scale, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                  EPS_IN_SQRT: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                  HAS_POUT: tl.constexpr, rem_ptr=None, idx=None, key_a=None, key_b=None,
                  HAS_REM: tl.constexpr = False, SR: tl.constexpr = False):
    g = _load(g_ptr, offs, mask)
    p = _load_y(p_ptr, rem_ptr, offs, mask, HAS_REM)
    v = _load(v_ptr, offs, mask)
    buf = v  # placeholders when the option is off (never stored)
    gavg = v
    if MOMENTUM:
        buf = _load(buf_ptr, offs, mask)
    if CENTERED:
        gavg = _load(gavg_ptr, offs, mask)
    p, v, buf, gavg = _rmsprop_math(g, p, v, buf, gavg, lr, alpha, eps,
                                    weight_decay, bias_correction2, momentum,
                                    grad_scale, HAS_WD, MAXIMIZE, MOMENTUM,
                                    CENTERED, EPS_IN_SQRT, BIAS_CORRECTION)
    _store_y(p_ptr, rem_ptr, offs, p, mask, HAS_REM)
    r = idx  # placeholders when SR is off (never used)
    r1 = idx
    if SR:
        r = _rand(idx, key_a)  # v: low half, the momentum buffer: high half
    _store_state(v_ptr, offs, v, mask, r, False, SR)
    if MOMENTUM:
        _store_state(buf_ptr, offs, buf, mask, r, True, SR)
    if CENTERED:
        if SR:
            r1 = _rand(idx, key_b)  # grad_avg: stream 1, low half
        _store_state(gavg_ptr, offs, gavg, mask, r1, False, SR)
    if HAS_POUT:
        _store(pout_ptr, offs, p, mask)


@triton.jit(do_not_specialize=_COUNTERS)
def rmsprop_flat_kernel(p_ptr, g_ptr, v_ptr, buf_ptr, gavg_ptr, pout_ptr, rem_ptr, n,
                        lr, alpha, eps, weight_decay, bias_correction2, momentum,
                        grad_scale, base_lo, base_hi, key_a, key_b,
                        HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                        MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                        EPS_IN_SQRT: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                        HAS_POUT: tl.constexpr, HAS_REM: tl.constexpr, SR: tl.constexpr,
                        BLOCK: tl.constexpr):
    # key_a: random stream 0 (v, momentum buffer), key_b: stream 1 (grad_avg)
    offs, mask, full = _flat_offsets(n, BLOCK)
    idx = _index(offs, base_lo, base_hi)
    if full:
        _rmsprop_body(p_ptr, g_ptr, v_ptr, buf_ptr, gavg_ptr, pout_ptr, offs, None,
                      lr, alpha, eps, weight_decay, bias_correction2, momentum,
                      grad_scale, HAS_WD, MAXIMIZE, MOMENTUM, CENTERED, EPS_IN_SQRT,
                      BIAS_CORRECTION, HAS_POUT, rem_ptr, idx, key_a, key_b,
                      HAS_REM, SR)
    else:
        _rmsprop_body(p_ptr, g_ptr, v_ptr, buf_ptr, gavg_ptr, pout_ptr, offs, mask,
                      lr, alpha, eps, weight_decay, bias_correction2, momentum,
                      grad_scale, HAS_WD, MAXIMIZE, MOMENTUM, CENTERED, EPS_IN_SQRT,
                      BIAS_CORRECTION, HAS_POUT, rem_ptr, idx, key_a, key_b,
                      HAS_REM, SR)


@triton.jit
def rmsprop_multi_kernel(p_tab, g_tab, v_tab, buf_tab, gavg_tab, pout_tab,
                         p_like, g_like, v_like, buf_like, gavg_like, pout_like,
                         chunk_tensor_ptr, chunk_start_ptr, numel_ptr,
                         lr, alpha, eps, weight_decay, bias_correction2, momentum,
                         grad_scale, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
                         MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                         EPS_IN_SQRT: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                         HAS_POUT: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = _chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, BLOCK)
    if FULL:
        mask = None
    buf_ptr = buf_like
    gavg_ptr = gavg_like
    pout_ptr = pout_like
    if MOMENTUM:
        buf_ptr = _ptr(buf_tab, t, buf_like, FULL)
    if CENTERED:
        gavg_ptr = _ptr(gavg_tab, t, gavg_like, FULL)
    if HAS_POUT:
        pout_ptr = _ptr(pout_tab, t, pout_like, FULL)
    _rmsprop_body(_ptr(p_tab, t, p_like, FULL), _ptr(g_tab, t, g_like, FULL),
                  _ptr(v_tab, t, v_like, FULL), buf_ptr, gavg_ptr, pout_ptr, offs, mask,
                  lr, alpha, eps, weight_decay, bias_correction2, momentum,
                  grad_scale, HAS_WD, MAXIMIZE, MOMENTUM, CENTERED, EPS_IN_SQRT,
                  BIAS_CORRECTION, HAS_POUT)


@triton.jit
def _interpolate_body(p_ptr, z_ptr, pout_ptr, rem_ptr, offs, mask, weight,
                      HAS_POUT: tl.constexpr, HAS_REM: tl.constexpr):
    p = _load_y(p_ptr, rem_ptr, offs, mask, HAS_REM)
    z = _load(z_ptr, offs, mask)
    p = _lerp(p, z, weight)
    _store_y(p_ptr, rem_ptr, offs, p, mask, HAS_REM)
    if HAS_POUT:
        _store(pout_ptr, offs, p, mask)


@triton.jit
def interpolate_flat_kernel(p_ptr, z_ptr, pout_ptr, rem_ptr, n, weight,
                            HAS_POUT: tl.constexpr, HAS_REM: tl.constexpr,
                            BLOCK: tl.constexpr):
    # p <- p + weight (z - p): y -> x with weight 1-1/b1, x -> y with 1-b1.
    offs, mask, full = _flat_offsets(n, BLOCK)
    if full:
        _interpolate_body(p_ptr, z_ptr, pout_ptr, rem_ptr, offs, None, weight, HAS_POUT, HAS_REM)
    else:
        _interpolate_body(p_ptr, z_ptr, pout_ptr, rem_ptr, offs, mask, weight, HAS_POUT, HAS_REM)
