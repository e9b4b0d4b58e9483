"""Fused CPU kernels for Dynamic World, in plain C compiled on first use (when a C compiler exists).

PyTorch has no fused Mish: ``aten::mish_`` evaluates exp, log1p and tanh per element in its own pass over
memory after every convolution, and a depthwise convolution, its Mish and the residual add are three more
passes. These kernels do each in one pass and are written so that a pixel gets the same bits wherever it
sits in a tensor (tiled inference stays exact, see ``_exact.py``):

- Mish as ``x * n / (n + 2)`` with ``n = e^x (e^x + 2)`` (= ``x * tanh(softplus(x))``), one ``exp``;
  ``exp`` is a Cephes-style polynomial written in plain IEEE arithmetic.
- All arithmetic is done in GCC vector types of 16 floats; a remainder is padded into a whole vector, so
  every element takes the same instruction sequence. Compiled with ``-ffp-contract=off`` (no fused
  multiply-add contraction) and without fast-math, the results do not depend on the instruction set:
  the AVX-512, AVX2 and baseline clones give identical bits.
- Depthwise 3x3: every output pixel sums its nine taps in the same order, a tap outside the image counting
  as zero (as the zero 'same' padding does).

The shared object is cached under ``$GEOSEG_CACHE_DIR`` (default ``~/.cache/geoseg``), keyed by a hash of
the source and the compiler. Without a compiler (or with ``GEOSEG_NATIVE=0``) ``lib()`` is None and the
model uses PyTorch's ops: the same model to within ~1e-6, tiled inference exact on either path, but the
two paths differ from each other in the last bits, so a job's workers must agree on the path (they
do when they run on the same image).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["lib", "available", "keep_heap", "mish_", "dw3x3_mish", "up2_l2_head", "down2_mish"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE v16 splat(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
INLINE v16 vsel(v16i m, v16 a, v16 b) { return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }
INLINE v16 vmin(v16 a, v16 b) { return vsel(a < b, a, b); }
INLINE v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }
INLINE v16 load(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
INLINE void store(float *p, v16 v) { memcpy(p, &v, sizeof v); }
INLINE v16 load_n(const float *p, int64_t n) { v16 v = splat(0.0f); memcpy(&v, p, (size_t)n * 4); return v; }
INLINE void store_n(float *p, v16 v, int64_t n) { memcpy(p, &v, (size_t)n * 4); }

/* e^x, Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, scaled by 2^n through the exponent bits. */
INLINE v16 vexp(v16 x) {
    x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
    /* n = round(x / ln2) by the 1.5 * 2^23 trick: the sum's low mantissa bits are n (|n| <= 127) */
    v16 t = x * splat(1.44269504088896341f) + splat(12582912.0f);
    v16i ti;
    memcpy(&ti, &t, sizeof ti);
    v16 fx = t - splat(12582912.0f);
    x = x - fx * splat(0.693359375f);
    x = x - fx * splat(-2.12194440e-4f);
    v16 z = x * x;
    v16 y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * z + x + splat(1.0f);
    v16i bits = (ti - 0x4B400000 + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* mish(x) = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2); from x = 20 on n + 2 == n in float. */
INLINE v16 vmish(v16 x) {
    v16 e = vexp(vmin(x, splat(20.0f)));
    v16 n = e * (e + splat(2.0f));
    return x * (n / (n + splat(2.0f)));
}

/* vmish on four vectors, step by step, so the four dependency chains interleave (the chain of one is long). */
INLINE void vmish4(v16 *v) {
    v16 x[4], t[4], fx[4], y[4], z[4];
    v16i ti[4];
    for (int i = 0; i < 4; i++) x[i] = vmin(vmax(vmin(v[i], splat(20.0f)), splat(-87.0f)), splat(88.0f));
    for (int i = 0; i < 4; i++) t[i] = x[i] * splat(1.44269504088896341f) + splat(12582912.0f);
    for (int i = 0; i < 4; i++) { memcpy(&ti[i], &t[i], sizeof ti[i]); fx[i] = t[i] - splat(12582912.0f); }
    for (int i = 0; i < 4; i++) x[i] = x[i] - fx[i] * splat(0.693359375f);
    for (int i = 0; i < 4; i++) x[i] = x[i] - fx[i] * splat(-2.12194440e-4f);
    for (int i = 0; i < 4; i++) { z[i] = x[i] * x[i]; y[i] = splat(1.9875691500e-4f); }
    for (int i = 0; i < 4; i++) y[i] = y[i] * x[i] + splat(1.3981999507e-3f);
    for (int i = 0; i < 4; i++) y[i] = y[i] * x[i] + splat(8.3334519073e-3f);
    for (int i = 0; i < 4; i++) y[i] = y[i] * x[i] + splat(4.1665795894e-2f);
    for (int i = 0; i < 4; i++) y[i] = y[i] * x[i] + splat(1.6666665459e-1f);
    for (int i = 0; i < 4; i++) y[i] = y[i] * x[i] + splat(5.0000001201e-1f);
    for (int i = 0; i < 4; i++) y[i] = y[i] * z[i] + x[i] + splat(1.0f);
    for (int i = 0; i < 4; i++) {
        v16i bits = (ti[i] - 0x4B400000 + 127) << 23;
        v16 scale;
        memcpy(&scale, &bits, sizeof scale);
        y[i] = y[i] * scale;                           /* e^x */
    }
    for (int i = 0; i < 4; i++) y[i] = y[i] * (y[i] + splat(2.0f));
    for (int i = 0; i < 4; i++) v[i] = v[i] * (y[i] / (y[i] + splat(2.0f)));
}

/* Mish of n floats from src to dst (the same instruction sequence for every element). */
INLINE void mish_copy(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        v16 v[4];
        for (int k = 0; k < 4; k++) v[k] = load(src + i + 16 * k);
        vmish4(v);
        for (int k = 0; k < 4; k++) store(dst + i + 16 * k, v[k]);
    }
    for (; i + 16 <= n; i += 16) store(dst + i, vmish(load(src + i)));
    if (i < n) store_n(dst + i, vmish(load_n(src + i, n - i)), n - i);
}

CLONES void geoseg_mish(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        v16 v[4];
        for (int k = 0; k < 4; k++) v[k] = load(x + i + 16 * k);
        vmish4(v);
        for (int k = 0; k < 4; k++) store(x + i + 16 * k, v[k]);
    }
    for (; i + 16 <= n; i += 16) store(x + i, vmish(load(x + i)));
    if (i < n) store_n(x + i, vmish(load_n(x + i, n - i)), n - i);
}

/* Fill ring slot `buf` ((W + 2) x C floats, a zero column each side) with image row `yy` of `plane` (pixels
   istride floats apart, C used), Mish applied when in_mish, or zeros when the row is outside the image. */
INLINE void fill_row(float *buf, const float *plane, int64_t istride, int64_t yy, int64_t H, int64_t W, int64_t C,
                     int64_t in_mish) {
    int64_t n = W * C;
    memset(buf, 0, (size_t)C * 4);
    memset(buf + (W + 1) * C, 0, (size_t)C * 4);
    if (yy < 0 || yy >= H) { memset(buf + C, 0, (size_t)n * 4); return; }
    const float *src = plane + yy * W * istride;
    float *dst = buf + C;
    if (istride == C) {
        if (in_mish) mish_copy(dst, src, n); else memcpy(dst, src, (size_t)n * 4);
        return;
    }
    for (int64_t x = 0; x < W; x++) {
        if (in_mish) mish_copy(dst + x * C, src + x * istride, C); else memcpy(dst + x * C, src + x * istride, (size_t)C * 4);
    }
}

/* bias + the nine taps of one pixel (o0: its column's offset in the ring rows), summed as a fixed tree. */
INLINE v16 dw_pixel(const float *p0, const float *p1, const float *p2, int64_t o0, int64_t C, const v16 *wk, v16 b) {
    const int64_t o1 = o0 + C, o2 = o1 + C;
    v16 s0 = wk[0] * load(p0 + o0) + wk[1] * load(p0 + o1);
    v16 s1 = wk[2] * load(p0 + o2) + wk[3] * load(p1 + o0);
    v16 s2 = wk[4] * load(p1 + o1) + wk[5] * load(p1 + o2);
    v16 s3 = wk[6] * load(p2 + o0) + wk[7] * load(p2 + o1);
    v16 s4 = wk[8] * load(p2 + o2) + b;
    return ((s0 + s1) + (s2 + s3)) + s4;  /* the remainder path below sums in this order too */
}

/* Depthwise 3x3 conv (zero 'same' padding) + bias + Mish [+ add], NHWC, for rows [r0, r1) of the N*H rows.
   in_mish: Mish is applied to the input first (the producing 1x1 conv's activation, fused here).
   add or NULL, mish applied to it when add_mish. in, add and out are NHWC with istride, astride and ostride
   floats per pixel (> C: a channel slice of a wider tensor). w: 9 x C, tap-major. scratch: 3 (W + 2) C floats.
   Every pixel sums bias then the nine taps in the same order, outside taps reading zeros. */
CLONES void geoseg_dw3x3(const float *in, int64_t istride, int64_t in_mish, float *out, int64_t ostride,
                         const float *w, const float *bias, const float *add, int64_t astride, int64_t add_mish, int64_t H, int64_t W, int64_t C,
                         int64_t r0, int64_t r1, float *scratch) {
    int64_t tag[3] = {-1, -1, -1};
    const int64_t rowlen = (W + 2) * C;
    for (int64_t r = r0; r < r1; r++) {
        int64_t img = r / H, y = r % H;
        const float *plane = in + img * H * W * istride;
        const float *rows[3];
        for (int dy = -1; dy <= 1; dy++) {
            int64_t key = img * (H + 2) + (y + dy + 1);
            int64_t slot = key % 3;
            float *buf = scratch + slot * rowlen;
            if (tag[slot] != key) { fill_row(buf, plane, istride, y + dy, H, W, C, in_mish); tag[slot] = key; }
            rows[dy + 1] = buf;
        }
        float *orow = out + r * W * ostride;
        const float *arow = add ? add + r * W * astride : 0;
        for (int64_t c = 0; c < C; c += 16) {
            int64_t m = C - c < 16 ? C - c : 16;
            if (m == 16) {
                v16 b = load(bias + c), wk[9];
                for (int k = 0; k < 9; k++) wk[k] = load(w + k * C + c);
                const float *p0 = rows[0] + c, *p1 = rows[1] + c, *p2 = rows[2] + c;
                int64_t x = 0;
                for (; x + 4 <= W; x += 4) {  /* four pixels at a time: independent chains interleave */
                    v16 v[4];
                    for (int k = 0; k < 4; k++) v[k] = dw_pixel(p0, p1, p2, (x + k) * C, C, wk, b);
                    vmish4(v);
                    if (arow) {
                        v16 a[4];
                        for (int k = 0; k < 4; k++) a[k] = load(arow + (x + k) * astride + c);
                        if (add_mish) vmish4(a);
                        for (int k = 0; k < 4; k++) v[k] = v[k] + a[k];
                    }
                    for (int k = 0; k < 4; k++) store(orow + (x + k) * ostride + c, v[k]);
                }
                for (; x < W; x++) {
                    v16 v = vmish(dw_pixel(p0, p1, p2, x * C, C, wk, b));
                    if (arow) {
                        v16 av = load(arow + x * astride + c);
                        v = v + (add_mish ? vmish(av) : av);
                    }
                    store(orow + x * ostride + c, v);
                }
            } else {  /* channel remainder: the same sequence on a zero-padded vector */
                v16 b = load_n(bias + c, m), wk[9];
                for (int k = 0; k < 9; k++) wk[k] = load_n(w + k * C + c, m);
                for (int64_t x = 0; x < W; x++) {
                    v16 t[9];
                    for (int k = 0; k < 9; k++) t[k] = wk[k] * load_n(rows[k / 3] + (x + k % 3) * C + c, m);
                    v16 acc = (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))) + (t[8] + b);
                    v16 v = vmish(acc);
                    if (arow) {
                        v16 av = load_n(arow + x * astride + c, m);
                        v = v + (add_mish ? vmish(av) : av);
                    }
                    store_n(orow + x * ostride + c, v, m);
                }
            }
        }
    }
}

/* Antialiased downsample by 2 of Mish(x): NHWC (H x W x C) -> (h x w x C), h = H / 2, w = W / 2, for output
   rows [r0, r1) of N*h. out[i, j] = (sum_a k_a sum_b k_b m[2i-1+a, 2j-1+b]) * (gy[i] * gx[j]), k = [1,3,3,1]/8,
   m = Mish(x) (zero outside the image), gy/gx the edge renormalisation. scratch: 4 (W + 2) C floats. */
CLONES void geoseg_down2_mish(const float *in, float *out, const float *gy, const float *gx, int64_t H, int64_t W,
                              int64_t C, int64_t h, int64_t w, int64_t r0, int64_t r1, float *scratch) {
    static const float k[4] = {0.125f, 0.375f, 0.375f, 0.125f};
    int64_t tag[4] = {-1, -1, -1, -1};
    const int64_t rowlen = (W + 2) * C;
    for (int64_t r = r0; r < r1; r++) {
        int64_t img = r / h, i = r % h;
        const float *plane = in + img * H * W * C;
        const float *rows[4];
        for (int a = 0; a < 4; a++) {
            int64_t yy = 2 * i - 1 + a, key = img * (H + 2) + (yy + 1), slot = key % 4;
            float *buf = scratch + slot * rowlen;
            if (tag[slot] != key) { fill_row(buf, plane, C, yy, H, W, C, 1); tag[slot] = key; }
            rows[a] = buf;
        }
        float *orow = out + r * w * C;
        for (int64_t j = 0; j < w; j++) {
            v16 g = splat(gy[i] * gx[j]);
            for (int64_t c = 0; c < C; c += 16) {
                int64_t m = C - c < 16 ? C - c : 16;
                v16 acc = splat(0.0f);
                for (int a = 0; a < 4; a++) {
                    v16 racc = splat(0.0f);
                    for (int b = 0; b < 4; b++) {
                        const float *p = rows[a] + (2 * j + b) * C + c;  /* column 2j-1+b, +1 for the pad */
                        racc = racc + splat(k[b]) * (m == 16 ? load(p) : load_n(p, m));
                    }
                    acc = acc + splat(k[a]) * racc;
                }
                v16 v = acc * g;
                if (m == 16) store(orow + j * C + c, v); else store_n(orow + j * C + c, v, m);
            }
        }
    }
}

INLINE void up2_taps(int64_t Y, int64_t h, int64_t *i0, int64_t *i1, float *l0, float *l1) {
    if (Y > 2 * h - 1) Y = 2 * h - 1;                 /* odd output size: the last row/column repeats */
    float src = ((float)Y + 0.5f) * 0.5f - 0.5f;      /* half-pixel centres, scale exactly 2 */
    if (src < 0.0f) src = 0.0f;
    *i0 = (int64_t)src;
    *l1 = src - (float)*i0;
    *l0 = 1.0f - *l1;
    *i1 = *i0 + 1 < h ? *i0 + 1 : h - 1;
}

/* Head of the network for output rows [r0, r1) of N*H: bilinear x2 of x (NHWC, h x w x C), L2 normalisation
   across channels, and the 1x1 head conv, given z = head_weight . x at low resolution (NHWC, K <= 16):
   out[n, k, Y, X] = up(z)_k * rsqrt(max(|up(x)|^2, 1e-12)) + b_k (linear algebra moves the conv before the
   upsample and the normalisation). out is NCHW. */
CLONES void geoseg_up2_l2_head(const float *x, const float *z, const float *b, float *out, int64_t h, int64_t w,
                               int64_t C, int64_t K, int64_t H, int64_t W, int64_t r0, int64_t r1) {
    v16 bias = load_n(b, K);
    for (int64_t r = r0; r < r1; r++) {
        int64_t img = r / H, Y = r % H, y0, y1;
        float ly0, ly1;
        up2_taps(Y, h, &y0, &y1, &ly0, &ly1);
        const float *xi = x + img * h * w * C, *zi = z + img * h * w * K;
        float *oi = out + img * K * H * W + Y * W;
        v16 a0 = splat(ly0), a1 = splat(ly1);
        for (int64_t X = 0; X < W; X++) {
            int64_t x0, x1;
            float lx0, lx1;
            up2_taps(X, w, &x0, &x1, &lx0, &lx1);
            v16 b0 = splat(lx0), b1 = splat(lx1);
            const float *p00 = xi + (y0 * w + x0) * C, *p01 = xi + (y0 * w + x1) * C;
            const float *p10 = xi + (y1 * w + x0) * C, *p11 = xi + (y1 * w + x1) * C;
            v16 ss = splat(0.0f);
            for (int64_t c = 0; c < C; c += 16) {
                int64_t m = C - c < 16 ? C - c : 16;
                v16 v;
                if (m == 16)
                    v = a0 * (b0 * load(p00 + c) + b1 * load(p01 + c)) + a1 * (b0 * load(p10 + c) + b1 * load(p11 + c));
                else
                    v = a0 * (b0 * load_n(p00 + c, m) + b1 * load_n(p01 + c, m))
                      + a1 * (b0 * load_n(p10 + c, m) + b1 * load_n(p11 + c, m));
                ss = ss + v * v;
            }
            float s = 0.0f;
            for (int l = 0; l < 16; l++) s += ss[l];
            float rn = 1.0f / __builtin_sqrtf(s > 1e-12f ? s : 1e-12f);
            v16 zv = a0 * (b0 * load_n(zi + (y0 * w + x0) * K, K) + b1 * load_n(zi + (y0 * w + x1) * K, K))
                   + a1 * (b0 * load_n(zi + (y1 * w + x0) * K, K) + b1 * load_n(zi + (y1 * w + x1) * K, K));
            v16 o = zv * splat(rn) + bias;
            for (int64_t k = 0; k < K; k++) oi[k * H * W + X] = o[k];
        }
    }
}
"""

_FLAGS = ["-O3", "-std=gnu11", "-Wno-psabi", "-fno-math-errno", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    base = os.environ.get("GEOSEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return Path(base)


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _build() -> ctypes.CDLL | None:
    if os.environ.get("GEOSEG_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, version]).encode()).hexdigest()[:16]
        so = None
        for base in (_cache_dir(), Path(tempfile.gettempdir()) / "geoseg-cache"):
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            so = base / f"native-{key}.so"
            if not so.exists():
                with tempfile.TemporaryDirectory(dir=base) as tmp:
                    src = Path(tmp) / "kernels.c"
                    src.write_text(_SOURCE)
                    out = Path(tmp) / "kernels.so"
                    subprocess.run([cc, *_FLAGS, "-o", str(out), str(src)], check=True, capture_output=True, timeout=300)
                    os.replace(out, so)  # atomic: concurrent workers each build, one file wins
            break
        if so is None:
            return None
        dll = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.geoseg_mish.argtypes = [ptr, i64]
    dll.geoseg_mish.restype = None
    dll.geoseg_dw3x3.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr]
    dll.geoseg_dw3x3.restype = None
    dll.geoseg_up2_l2_head.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64]
    dll.geoseg_up2_l2_head.restype = None
    dll.geoseg_down2_mish.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr]
    dll.geoseg_down2_mish.restype = None
    return dll


def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, not Linux, ``GEOSEG_NATIVE=0``, or the build failed)."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _build()
    return _lib  # type: ignore[return-value]


def available() -> bool:
    return lib() is not None


def _run(calls: list) -> None:
    """Run ctypes calls (they release the GIL) on up to torch.get_num_threads() threads."""
    global _pool
    if len(calls) == 1:
        fn, args = calls[0]
        fn(*args)
        return
    threads = min(len(calls), torch.get_num_threads())
    if _pool is None or _pool._max_workers != threads:  # noqa: SLF001
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="geoseg-native")
    for f in [_pool.submit(fn, *args) for fn, args in calls]:
        f.result()


def _splits(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)] if n else []


def _threads(work: int) -> int:
    """Pieces to cut ``work`` elements into: 4 per thread, so a thread that the OS pauses (a shared machine) holds
    up a quarter of its share, not all of it; one piece for small work."""
    threads = max(1, min(torch.get_num_threads(), work // 65536 or 1))
    return 1 if threads == 1 else 4 * threads


def mish_(x: torch.Tensor) -> torch.Tensor:
    """In-place Mish on a contiguous or channels_last float32 CPU tensor (every element, same bits anywhere)."""
    dll = lib()
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError("mish_ needs a contiguous or channels_last tensor")
    n, base = x.numel(), x.data_ptr()
    _run([(dll.geoseg_mish, (base + 4 * a, b - a)) for a, b in _splits(n, _threads(n), 16)])
    return x


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("native kernels take float32 CPU tensors")
    return x.contiguous(memory_format=torch.channels_last)


def _pixels(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as NHWC memory with its pixel stride: channels_last, or a channel slice of a channels_last tensor."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("native kernels take float32 CPU tensors")
    n, c, h, w = x.shape
    s = x.stride(3)
    if x.stride(1) == 1 and s >= c and x.stride(2) == w * s and (n == 1 or x.stride(0) == h * w * s):
        return x, s
    return x.contiguous(memory_format=torch.channels_last), c


def dw3x3_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    in_mish: bool = False,
    add: torch.Tensor | None = None,
    add_mish: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mish(depthwise 3x3 conv (zero padding) of [Mish of] ``x`` + bias) [+ [Mish of] ``add``], channels_last.

    ``x``, ``add``, ``out``: channels_last tensors or channel slices of one (e.g. ``buf[:, :c]``).
    """
    dll = lib()
    x, istride = _pixels(x)
    n, c, h, w = x.shape
    taps = weight.reshape(c, 9).t().contiguous()  # 9 x C
    bias = bias.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    out_, ostride = _pixels(out)
    if out_ is not out or out.shape != x.shape:
        raise ValueError("out must be channels_last (or a channel slice of a channels_last tensor) of x's shape")
    astride = 0
    if add is not None:
        add, astride = _pixels(add)
        if add.shape != x.shape:
            raise ValueError("add must have x's shape")
    rows = n * h
    parts = _splits(rows, _threads(x.numel()))
    scratch = torch.empty(len(parts), 3 * (w + 2) * c)
    calls = [
        (
            dll.geoseg_dw3x3,
            (x.data_ptr(), istride, int(in_mish), out.data_ptr(), ostride, taps.data_ptr(), bias.data_ptr(),
             add.data_ptr() if add is not None else None, astride, int(add_mish), h, w, c, r0, r1,
             scratch[i].data_ptr()),
        )
        for i, (r0, r1) in enumerate(parts)
    ]
    _run(calls)
    return out


def down2_mish(x: torch.Tensor, gain_rows: torch.Tensor, gain_cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Antialiased halving of Mish(x) (channels_last) into ``out`` (N, C, H // 2, W // 2), edge gains given."""
    dll = lib()
    x = _nhwc(x)
    n, c, big_h, big_w = x.shape
    h, w = big_h // 2, big_w // 2
    if out.shape != (n, c, h, w) or not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("down2_mish: out must be channels_last (N, C, H // 2, W // 2)")
    gy, gx = gain_rows.float().contiguous(), gain_cols.float().contiguous()
    parts = _splits(n * h, _threads(x.numel()))
    scratch = torch.empty(len(parts), 4 * (big_w + 2) * c)
    _run([
        (dll.geoseg_down2_mish,
         (x.data_ptr(), out.data_ptr(), gy.data_ptr(), gx.data_ptr(), big_h, big_w, c, h, w, r0, r1, scratch[i].data_ptr()))
        for i, (r0, r1) in enumerate(parts)
    ])
    return out


def up2_l2_head(x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``head(l2_normalize(upsample2(x)))`` from x (N, C, h, w) and z = head.weight . x (N, K, h, w): NCHW out."""
    dll = lib()
    x, z = _nhwc(x), _nhwc(z)
    n, c, h, w = x.shape
    k = z.shape[1]
    if k > 16 or z.shape[-2:] != x.shape[-2:]:
        raise ValueError("up2_l2_head: at most 16 classes, z on x's grid")
    big_h, big_w = size
    bias = bias.contiguous()
    out = torch.empty(n, k, big_h, big_w)
    calls = [
        (dll.geoseg_up2_l2_head,
         (x.data_ptr(), z.data_ptr(), bias.data_ptr(), out.data_ptr(), h, w, c, k, big_h, big_w, r0, r1))
        for r0, r1 in _splits(n * big_h, _threads(out.numel() * 16))
    ]
    _run(calls)
    return out



_HEAP_KEPT = False


def keep_heap() -> None:
    """Serve large allocations from the heap and keep freed memory for reuse (glibc; a no-op elsewhere).

    glibc maps every allocation over 32 MB anew and unmaps it on free, so each forward pass page-faults and
    zero-fills its large activations again: ~20 ms per 40 MB tensor, more than the work done on it. TensorFlow's
    allocator keeps such memory; this does the same for the process (``M_MMAP_MAX=0``: no mmap for large
    blocks; ``M_TRIM_THRESHOLD`` 1 GiB: freed memory stays until ``malloc_trim``, which the pipeline calls
    after each block, see ``geoseg._memory``). Called once by the first native forward pass.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT or not sys.platform.startswith("linux"):
        return
    _HEAP_KEPT = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_max, 0)
