/* The fused statistics of one tile of logits, for tl_logitlens.kernel.native (built at first use).
 *
 * The tiled kernel (tiles.py) computes a [m, w] tile of raw logits with one matrix product and
 * hands it here while it is still in cache. Each row is read twice, both times from L1/L2: once
 * for its maximum and the top-k (blocks of 64 columns whose maximum does not beat the running
 * k-th value are skipped), once for the exponential sums, the KL cross term and the targets'
 * counts. The eager path (tiles.py, _EagerTiles) computes the same numbers in about a dozen
 * passes of separate tensor operations, each going back to memory.
 *
 * The statistics are running sums over the tiles, shifted by each row's running maximum p:
 *   Z = sum exp(l - p),  A = sum exp(l - p) * (l - p),  D = sum exp(l_ref - p_ref) * (l - p)
 * and when a tile raises p to p' the sums so far are rescaled by exp(p - p') (A and D also move
 * by (p - p') * Z, D by the reference row's Z and scale). Exponentials are 2**t on t = (l - p) *
 * log2(e), with a degree-6 polynomial on [-1/2, 1/2] (relative error 2e-9, float32 rounds) so that the
 * loop vectorises without -ffast-math: IEEE semantics are kept (no reassociation outside the
 * `omp simd` reductions). Plain C, no torch headers: it compiles in a fraction of a second.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
static const float LOG2E = 1.4426950408889634f;
static const float LN2 = 0.6931471805599453f;

/* 2**t: exact to float32 rounding for t in [-126, 0]; 0 below about -126.5; t > 127 is clamped. */
static inline float exp2_poly(float t) {
    t = t < -127.0f ? -127.0f : t;
    t = t > 127.0f ? 127.0f : t;
    float n = (t + 12582912.0f) - 12582912.0f; /* t rounded to an integer (1.5 * 2**23 trick) */
    float r = t - n;                            /* in [-0.5, 0.5] */
    float p = 1.5337576830683796e-04f; /* near-minimax on [-1/2, 1/2]: relative error 2e-9 */
    p = p * r + 1.3399860363037684e-03f;
    p = p * r + 9.6185195343568840e-03f;
    p = p * r + 5.5503289975178886e-02f;
    p = p * r + 2.4022646608713890e-01f;
    p = p * r + 6.9314720560051060e-01f;
    p = p * r + 1.0000000005920204f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2**n; n = -127 gives 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Insert v (column id) into the sorted top-k (descending); v beats the k-th value. */
static void insert_top(float v, int64_t id, int64_t k, float *values, int64_t *ids) {
    int64_t q = k - 1;
    while (q > 0 && values[q - 1] < v) {
        values[q] = values[q - 1];
        ids[q] = ids[q - 1];
        q--;
    }
    values[q] = v;
    ids[q] = id;
}

/* The row's maximum; with k > 0, every column above the running k-th value enters the top k,
 * searched only inside blocks whose maximum beats it (after the first tiles, few do). */
static float row_max_top_k(const float *row, int64_t w, int64_t col0, int64_t k, float *values, int64_t *ids) {
    float threshold = k > 0 ? values[k - 1] : INFINITY;
    float peak = -INFINITY;
    int64_t j = 0;
    for (; j + BLOCK <= w; j += BLOCK) {
        float block = -INFINITY;
#pragma omp simd reduction(max : block)
        for (int q = 0; q < BLOCK; q++) block = row[j + q] > block ? row[j + q] : block;
        peak = block > peak ? block : peak;
        if (block > threshold)
            for (int q = 0; q < BLOCK; q++)
                if (row[j + q] > threshold) {
                    insert_top(row[j + q], col0 + j + q, k, values, ids);
                    threshold = values[k - 1];
                }
    }
    for (; j < w; j++) {
        peak = row[j] > peak ? row[j] : peak;
        if (row[j] > threshold) {
            insert_top(row[j], col0 + j, k, values, ids);
            threshold = values[k - 1];
        }
    }
    return peak;
}

/* Z, A and D of one row shifted by `peak` (A and D in log2 units), and how many values beat
 * `threshold`; `ref_exps`: the reference row's exponentials (D is read), `keep_exps`: where this
 * row's go. The flags are constants at every call, so each combination compiles to its own loop. */
static inline __attribute__((always_inline)) void sums_loop(const float *row, int64_t w, float shift,
                                                            const float *ref_exps, float *keep_exps, float threshold,
                                                            const int with_ref, const int keep, const int count,
                                                            float *out, int64_t *above) {
    float z = 0.f, a = 0.f, d = 0.f;
    int64_t c = 0;
#pragma omp simd reduction(+ : z, a, d, c)
    for (int64_t j = 0; j < w; j++) {
        float t = row[j] * LOG2E - shift;
        float e = exp2_poly(t);
        if (keep) keep_exps[j] = e;
        z += e;
        a += e * t;
        if (with_ref) d += ref_exps[j] * t;
        if (count) c += row[j] > threshold;
    }
    out[0] = z;
    out[1] = a;
    out[2] = d;
    *above = c;
}

/* Z, A and D (in nats) of one row shifted by `peak`, and with `count` the values above `threshold`. */
static void row_sums(const float *row, int64_t w, float peak, const float *ref_exps, float *keep_exps, int count,
                     float threshold, float *z_out, float *a_out, float *d_out, int64_t *above) {
    float out[3];
    const float shift = peak * LOG2E;
    if (ref_exps && count)
        sums_loop(row, w, shift, ref_exps, NULL, threshold, 1, 0, 1, out, above);
    else if (ref_exps)
        sums_loop(row, w, shift, ref_exps, NULL, threshold, 1, 0, 0, out, above);
    else if (keep_exps && count)
        sums_loop(row, w, shift, NULL, keep_exps, threshold, 0, 1, 1, out, above);
    else if (keep_exps)
        sums_loop(row, w, shift, NULL, keep_exps, threshold, 0, 1, 0, out, above);
    else if (count)
        sums_loop(row, w, shift, NULL, NULL, threshold, 0, 0, 1, out, above);
    else
        sums_loop(row, w, shift, NULL, NULL, threshold, 0, 0, 0, out, above);
    *z_out = out[0];
    *a_out = out[1] * LN2;
    *d_out = out[2] * LN2;
}

static int64_t count_above(const float *row, int64_t w, float threshold) {
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < w; j++) c += row[j] > threshold;
    return c;
}

/* Everything fold_tile keeps per row, and the per-row inputs (see fold_tile). */
typedef struct {
    float *peak, *total, *spread, *cross; /* [m]; cross NULL without a reference */
    float *ref_exps;                      /* [n, w] the reference rows' exponentials of this tile */
    float *ref_prev;                      /* [n, 2] the reference rows' Z and rescale before this tile */
    int64_t k;
    float *top_values;
    int64_t *top_ids; /* [m, k] */
    int64_t t;
    const float *thresholds;
    float *above; /* [m, t]: columns above each threshold */
    const int64_t *next_tokens;
    float *next_logit; /* [n] ids (-1: none), [m] */
    const int64_t *target_ids;
    float *target_logits; /* [n, t], [m, t] */
} State;

/* Threads worth waking for `logits` values: a thread per 32768 (about 10 us of work), so that a
 * small tile never waits at a barrier for a thread that a busy machine has descheduled. Rows are
 * handed out 16 at a time (dynamic schedule) for the same reason: a thread that loses its core
 * for a while leaves its rows to the others instead of holding up the tile. */
static int team(int threads, int64_t logits) {
    int64_t useful = logits / 32768;
    return useful < 1 ? 1 : (useful < threads ? (int)useful : threads);
}

/* Row r (row i of its entry) of a tile whose column 0 is vocabulary column col0. */
static void fold_row(const float *row, int64_t w, int64_t r, int64_t i, int64_t col0, int is_ref, const State *s) {
    int64_t k = s->k;
    float row_peak = row_max_top_k(row, w, col0, k, k ? s->top_values + r * k : NULL, k ? s->top_ids + r * k : NULL);
    float old = s->peak[r];
    float peak = row_peak > old ? row_peak : old;
    float step = 0.f, decay = 1.f;
    if (old != -INFINITY) { /* not the first tile: move the sums so far to the new peak */
        step = old - peak;
        decay = expf(step);
    }
    float z, a, d;
    int64_t above = 0;
    const float *ref = s->cross && !is_ref ? s->ref_exps + i * w : NULL;
    float *keep = is_ref && s->cross ? s->ref_exps + i * w : NULL;
    /* one target (the next token, the usual case) is counted in the same pass */
    row_sums(row, w, peak, ref, keep, s->t == 1, s->t == 1 ? s->thresholds[r] : 0.f, &z, &a, &d, &above);
    if (s->cross) {
        if (is_ref) { /* D of the reference against itself is its A */
            d = a;
            s->ref_prev[2 * i] = s->total[r];
            s->ref_prev[2 * i + 1] = decay;
        }
        s->cross[r] = (s->cross[r] + step * s->ref_prev[2 * i]) * s->ref_prev[2 * i + 1] + d;
    }
    s->spread[r] = (s->spread[r] + step * s->total[r]) * decay + a;
    s->total[r] = s->total[r] * decay + z;
    s->peak[r] = peak;
    if (s->t == 1)
        s->above[r] += (float)above;
    else
        for (int64_t q = 0; q < s->t; q++)
            s->above[r * s->t + q] += (float)count_above(row, w, s->thresholds[r * s->t + q]);
    if (s->next_tokens) {
        int64_t at = s->next_tokens[i] - col0;
        if (at >= 0 && at < w) s->next_logit[r] = row[at];
    }
    if (s->target_ids)
        for (int64_t q = 0; q < s->t; q++) {
            int64_t at = s->target_ids[i * s->t + q] - col0;
            if (at >= 0 && at < w) s->target_logits[r * s->t + q] = row[at];
        }
}

/* Fold one tile [m, w] of raw float32 logits (contiguous rows), m = entries * n rows, into the
 * running statistics. With a reference (cross != NULL) entry 0's rows are it: they are read
 * first (their exponentials kept in ref_exps), then every other row against them. Pointers
 * of statistics not asked for are NULL (k = 0: no top-k; t = 0: no targets, else thresholds,
 * above, target_ids and target_logits are all given). */
int fold_tile(const float *tile, int64_t m, int64_t w, int64_t n, int64_t col0, float *peak, float *total,
              float *spread, float *cross, float *ref_exps, float *ref_prev, int64_t k, float *top_values,
              int64_t *top_ids, int64_t t, const float *thresholds, float *above, const int64_t *next_tokens,
              float *next_logit, const int64_t *target_ids, float *target_logits, int threads) {
    State s = {peak, total,    spread,     cross, ref_exps,    ref_prev,   k,          top_values,
               top_ids, t, thresholds, above, next_tokens, next_logit, target_ids, target_logits};
    int64_t first = cross ? n : 0;
    threads = team(threads, m * w);
    if (cross) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
        for (int64_t r = 0; r < n; r++) fold_row(tile + r * w, w, r, r, col0, 1, &s);
    }
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t r = first; r < m; r++) fold_row(tile + r * w, w, r, r % n, col0, 0, &s);
    return 0;
}

/* For the training loss (loss.py): each row of a tile [m, w] of raw logits becomes
 * exp(l - p') in place, p' = max(p, the row's maximum) its new running maximum (p is ignored
 * when `first`), and the row's accumulators acc[r, :cols] (row stride acc_ld) are rescaled by
 * exp(p - p') when the maximum rose. */
int shift_exp(float *tile, int64_t m, int64_t w, float *peak, float *acc, int64_t cols, int64_t acc_ld, int first,
              int threads) {
    threads = team(threads, m * w);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t r = 0; r < m; r++) {
        float *row = tile + r * w;
        float row_peak = -INFINITY;
#pragma omp simd reduction(max : row_peak)
        for (int64_t j = 0; j < w; j++) row_peak = row[j] > row_peak ? row[j] : row_peak;
        float p = first || row_peak > peak[r] ? row_peak : peak[r];
        if (!first && p > peak[r]) {
            float decay = expf(peak[r] - p);
            for (int64_t c = 0; c < cols; c++) acc[r * acc_ld + c] *= decay;
        }
        peak[r] = p;
        const float shift = p * LOG2E;
#pragma omp simd
        for (int64_t j = 0; j < w; j++) row[j] = exp2_poly(row[j] * LOG2E - shift);
    }
    return 0;
}
