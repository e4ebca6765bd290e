/* deltabkp.engine._blockloop: the project's loops over a whole buffer, in C, the GIL released.
 *
 * blocks(): the loop of deltabkp/engine/_blake2.py over many blocks.  Why: a ctypes call
 * holds the GIL ~1.2 us per block around the library's BLAKE2b, and with helper threads
 * hashing at once every block hands the GIL back and forth.  Here one call hashes a whole
 * task's blocks with the GIL released, so the threads run side by side.  The hash itself
 * stays the library's (libsodium or libb2, loaded and checked against hashlib by _blake2.py,
 * which passes the checked function's address): this module has no hash of its own, no
 * link-time dependency and no header beyond Python's.
 *
 * gear_cuts(): the archive's content-defined cut points (deltabkp/archive/_gzip.py's
 * CutFinder, docs/formats.md "Cut points"), one rolling sum per byte instead of numpy's
 * passes: the gear table and the rule's numbers come from _gzip.py (their one home), which
 * checks this scan against its numpy one when it loads and uses it only if they agree.
 * Why: the build's iterating thread finds the cuts, and every 0.1 s it holds a core (and
 * the GIL, between numpy's calls) delays the walk and the deflate workers.
 *
 * deflate_job(): one compression job of the archive (deltabkp/archive/_libz.py): zlib's
 * deflate over the job's segments, a sync flush after each, through the function at the
 * address _libz.py passes (libz loaded and checked there; the z_stream set up there).  Why:
 * ctypes takes the GIL back after every segment (~14,000 a build), and under load a deflate
 * worker waiting for the GIL also waits for its holder to be scheduled; here once a job.
 *
 * One module for all three: one optional extension to build, ship and check.  It is
 * optional: without a compiler the package installs without it, _blake2.py loops through
 * ctypes, _gzip.py finds cuts with numpy and _libz.py calls deflate through ctypes.
 *
 * Invariants: every bound is checked before a pointer is formed (the caller's buffers are
 * held through the buffer protocol for the whole loop); blocks() stops at the first status
 * other than 0 and reports that block, whose digest must not be used; gear_cuts() rejects a
 * state no feed could have left (ValueError) before it reads a byte.
 */
/* The stable ABI of 3.11 (Py_buffer joined it then): one wheel for every later CPython. */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define DIGEST 32

/* int crypto_generichash_blake2b(out, size_t outlen, in, unsigned long long inlen, key,
 * size_t keylen) */
typedef int (*sodium_fn)(unsigned char *, size_t, const unsigned char *, unsigned long long,
                         const unsigned char *, size_t);
/* libb2 0.98.1 (Debian's libb2-1): int blake2b(out, in, key, size_t outlen, size_t inlen,
 * size_t keylen); 0.98 had uint8_t, uint64_t, uint8_t there: full-width arguments are read
 * the same by both on 64-bit ABIs (and the load check refuses a library that reads otherwise). */
typedef int (*b2_fn)(uint8_t *, const void *, const void *, size_t, size_t, size_t);

enum { ORDER_SODIUM = 0, ORDER_B2 = 1 };

PyDoc_STRVAR(blocks_doc,
"blocks(fn, order, data, start, count, size, out) -> (index, status)\n\n"
"BLAKE2b-256 of ``count`` blocks of ``size`` bytes of ``data`` from ``start``, written one\n"
"after the other into ``out``, through the C function at address ``fn`` (its argument\n"
"order: 0 libsodium's crypto_generichash_blake2b, 1 libb2's blake2b). Returns\n"
"(-1, 0), or the first block whose call failed and that call's status.");

static PyObject *
blocks(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    int order;
    Py_buffer src, dst;
    Py_ssize_t start, count, size;
    if (!PyArg_ParseTuple(args, "Kiy*nnnw*", &addr, &order, &src, &start, &count, &size, &dst))
        return NULL;
    PyObject *result = NULL;
    if (addr == 0 || (order != ORDER_SODIUM && order != ORDER_B2)) {
        PyErr_SetString(PyExc_ValueError, "no BLAKE2b function");
        goto done;
    }
    /* start + count * size <= len, without overflow; count * DIGEST <= out's length. */
    if (start < 0 || count < 0 || size <= 0 || start > src.len
        || (count > 0 && (src.len - start) / size < count)
        || count > dst.len / DIGEST) {
        PyErr_Format(PyExc_ValueError,
                     "%zd blocks of %zd B from %zd do not fit %zd B (or %zd B of digests)",
                     count, size, start, src.len, dst.len);
        goto done;
    }
    const unsigned char *in = (const unsigned char *)src.buf + start;
    unsigned char *out = (unsigned char *)dst.buf;
    Py_ssize_t failed = -1;
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    if (order == ORDER_SODIUM) {
        sodium_fn fn = (sodium_fn)(uintptr_t)addr;
        for (Py_ssize_t i = 0; i < count; i++) {
            status = fn(out + i * DIGEST, DIGEST, in + i * size, (unsigned long long)size,
                        NULL, 0);
            if (status != 0) { failed = i; break; }
        }
    } else {
        b2_fn fn = (b2_fn)(uintptr_t)addr;
        for (Py_ssize_t i = 0; i < count; i++) {
            status = fn(out + i * DIGEST, in + i * size, NULL, DIGEST, (size_t)size, 0);
            if (status != 0) { failed = i; break; }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(ni)", failed, status);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(gear_cuts_doc,
"gear_cuts(table, window, threshold, min_segment, max_segment, tail, data, pos, last)\n"
"    -> (cuts, tail, pos, last)\n\n"
"The cut points of ``data``, the stream's bytes from offset ``pos`` on (docs/formats.md,\n"
"\"Cut points\"): ``table`` is the 256 gear values as little-endian 16-bit words (512 bytes);\n"
"a window of ``window`` bytes whose gear sum mod 2^16 is below ``threshold`` is a candidate;\n"
"a cut needs ``min_segment`` bytes after the previous one, and is forced after\n"
"``max_segment``.  The state: ``tail``, the stream's bytes just before ``pos`` (at most\n"
"``window - 1``, fewer only at its start), and ``last``, the offset of the previous cut.\n"
"Returns the cuts (absolute offsets, ascending) and the state after ``data``.");

#define GEAR_TABLE 256

static PyObject *
gear_cuts(PyObject *self, PyObject *args)
{
    Py_buffer tab, tl, src;
    Py_ssize_t window, threshold, min_seg, max_seg;
    long long pos, last;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*LL", &tab, &window, &threshold, &min_seg, &max_seg,
                          &tl, &src, &pos, &last))
        return NULL;
    PyObject *result = NULL, *cuts_list = NULL, *tail_out = NULL;
    long long *cuts = NULL;
    const Py_ssize_t n = src.len, t = tl.len;
    if (tab.len != 2 * GEAR_TABLE || window < 1 || window > 65536 || threshold < 0
        || threshold > 65536 || min_seg < 1 || max_seg < min_seg) {
        PyErr_Format(PyExc_ValueError,
                     "bad cut rule: a %zd-byte table (512 wanted), window %zd, threshold %zd, "
                     "segments %zd..%zd", tab.len, window, threshold, min_seg, max_seg);
        goto done;
    }
    /* A state some feed could have left: no cut ahead of the stream, a segment shorter than
     * the forced cut, no more tail than the stream and the window hold; and no overflow. */
    if (pos < 0 || last < 0 || last > pos || pos - last >= max_seg || t >= window || t > pos
        || pos > LLONG_MAX - n) {
        PyErr_Format(PyExc_ValueError,
                     "bad cut finder state: %zd tail bytes, offset %lld, last cut %lld",
                     t, pos, last);
        goto done;
    }
    /* Each cut is at least min_seg after the one before, the first at least min_seg after
     * ``last``. */
    const long long cap = (pos - last + n) / min_seg + 1;
    if ((unsigned long long)cap > PY_SSIZE_T_MAX / sizeof(long long)) {
        PyErr_NoMemory();
        goto done;
    }
    cuts = PyMem_Malloc((size_t)cap * sizeof(long long));
    if (cuts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint16_t g[GEAR_TABLE];
    const unsigned char *tb = (const unsigned char *)tab.buf;
    for (int v = 0; v < GEAR_TABLE; v++)
        g[v] = (uint16_t)(tb[2 * v] | (tb[2 * v + 1] << 8));
    const unsigned char *d = (const unsigned char *)src.buf;
    const unsigned char *tp = (const unsigned char *)tl.buf;
    const long long lo = min_seg, hi = max_seg;
    const unsigned thr = (unsigned)threshold;
    Py_ssize_t count = 0;
    long long lst = last;
    Py_BEGIN_ALLOW_THREADS
    /* The stream seen as tail + data: byte k of it is at offset pos - t + k, the window
     * ending at k is whole from k = window - 1 on, and a cut after k is at pos - t + k + 1. */
    uint16_t s = 0;
    for (Py_ssize_t k = 0; k < t; k++)
        s = (uint16_t)(s + g[tp[k]]);
    Py_ssize_t i = 0;
    /* While the byte leaving the window is the tail's (t + i - window < t), or none has
     * left yet. */
    const Py_ssize_t head = n < window ? n : window;
    for (; i < head; i++) {
        const Py_ssize_t k = t + i;
        s = (uint16_t)(s + g[d[i]]);
        if (k >= window)
            s = (uint16_t)(s - g[tp[k - window]]);
        const long long c = pos + i + 1;
        if ((k >= window - 1 && s < thr && c - lst >= lo) || c - lst == hi)
            cuts[count++] = lst = c;
    }
    /* From here the byte leaving is data's own, and every window is whole.  Candidates are
     * rare (1/4096 of windows) and forced cuts rarer: 8 windows are summed and tested at
     * once, and only a stretch with a candidate, or the one the forced cut falls in, is
     * walked byte by byte. */
    while (i < n) {
        /* the index whose cut would be forced: c - lst == hi */
        const long long force = (lst - pos) + hi - 1;  /* lst <= pos: no overflow */
        const Py_ssize_t stop = force < n ? (Py_ssize_t)force : n;
        while (i + 8 <= stop) {
            const uint16_t s0 = (uint16_t)(s + g[d[i]] - g[d[i - window]]);
            const uint16_t s1 = (uint16_t)(s0 + g[d[i + 1]] - g[d[i + 1 - window]]);
            const uint16_t s2 = (uint16_t)(s1 + g[d[i + 2]] - g[d[i + 2 - window]]);
            const uint16_t s3 = (uint16_t)(s2 + g[d[i + 3]] - g[d[i + 3 - window]]);
            const uint16_t s4 = (uint16_t)(s3 + g[d[i + 4]] - g[d[i + 4 - window]]);
            const uint16_t s5 = (uint16_t)(s4 + g[d[i + 5]] - g[d[i + 5 - window]]);
            const uint16_t s6 = (uint16_t)(s5 + g[d[i + 6]] - g[d[i + 6 - window]]);
            const uint16_t s7 = (uint16_t)(s6 + g[d[i + 7]] - g[d[i + 7 - window]]);
            if ((s0 < thr) | (s1 < thr) | (s2 < thr) | (s3 < thr) | (s4 < thr) | (s5 < thr)
                | (s6 < thr) | (s7 < thr))
                break;
            s = s7;
            i += 8;
        }
        const Py_ssize_t end = n - i < 8 ? n : i + 8;
        for (; i < end; i++) {
            s = (uint16_t)(s + g[d[i]] - g[d[i - window]]);
            const long long c = pos + i + 1;
            if ((s < thr && c - lst >= lo) || c - lst == hi)
                cuts[count++] = lst = c;
        }
    }
    Py_END_ALLOW_THREADS
    cuts_list = PyList_New(count);
    if (cuts_list == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *c = PyLong_FromLongLong(cuts[j]);
        if (c == NULL || PyList_SetItem(cuts_list, j, c) < 0)
            goto done;
    }
    /* The new tail: the last window - 1 bytes of tail + data (all of them if fewer). */
    const Py_ssize_t keep = t + n < window - 1 ? t + n : window - 1;
    tail_out = PyBytes_FromStringAndSize(NULL, keep);
    if (tail_out == NULL)
        goto done;
    char *out = PyBytes_AsString(tail_out);
    if (out == NULL)
        goto done;
    if (keep > n) {
        memcpy(out, tp + t - (keep - n), (size_t)(keep - n));
        if (n > 0)
            memcpy(out + (keep - n), d, (size_t)n);
    } else if (keep > 0) {
        memcpy(out, d + n - keep, (size_t)keep);
    }
    result = Py_BuildValue("(OOLL)", cuts_list, tail_out, pos + n, lst);
done:
    Py_XDECREF(cuts_list);
    Py_XDECREF(tail_out);
    PyMem_Free(cuts);
    PyBuffer_Release(&tab);
    PyBuffer_Release(&tl);
    PyBuffer_Release(&src);
    return result;
}

/* zlib.h's z_stream, field for field (its layout has not changed since zlib 1.0; zlib checks
 * sizeof(z_stream) at deflateInit2_, made by _libz.py with the same layout in ctypes). */
typedef struct {
    const unsigned char *next_in;
    unsigned int avail_in;
    unsigned long total_in;
    unsigned char *next_out;
    unsigned int avail_out;
    unsigned long total_out;
    const char *msg;
    void *state;
    void *zalloc;
    void *zfree;
    void *opaque;
    int data_type;
    unsigned long adler;
    unsigned long reserved;
} dbkp_z_stream;

typedef int (*deflate_fn)(dbkp_z_stream *, int);

enum { DZ_OK = 0, DZ_STREAM_END = 1, DZ_BUF_ERROR = -5, DZ_NO_FLUSH = 0, DZ_SYNC_FLUSH = 2,
       DZ_FINISH = 4 };
/* deflate_job's own statuses: the output buffer filled (undone, as far as zlib knows), or
 * zlib left input unread. */
enum { DJ_FULL = -100, DJ_INPUT_LEFT = -101 };

PyDoc_STRVAR(deflate_job_doc,
"deflate_job(fn, stream, data, cuts, final, out, ends) -> (status, index, total_out)\n\n"
"zlib's deflate (the function at address ``fn``) on the initialised z_stream at address\n"
"``stream`` (total_out 0): each segment of ``data`` up to the next of ``cuts`` (int64,\n"
"ascending, within ``data``; a non-final job ends at its last cut) then a sync flush, and\n"
"after the last cut the rest with Z_FINISH if ``final``; output into ``out``, each cut's\n"
"output end into ``ends`` (int64).  Returns (0, -1, total_out), or the first failing\n"
"segment's status (zlib's code, -100 ``out`` filled, -101 input left unread) and index.");

static PyObject *
deflate_job(PyObject *self, PyObject *args)
{
    unsigned long long addr, strm;
    int final;
    Py_buffer src, cb, dst, eb;
    if (!PyArg_ParseTuple(args, "KKy*y*pw*w*", &addr, &strm, &src, &cb, &final, &dst, &eb))
        return NULL;
    PyObject *result = NULL;
    const long long *cuts = (const long long *)cb.buf;
    long long *ends = (long long *)eb.buf;
    const Py_ssize_t ncuts = cb.len / (Py_ssize_t)sizeof(long long);
    dbkp_z_stream *s = (dbkp_z_stream *)(uintptr_t)strm;
    if (addr == 0 || strm == 0) {
        PyErr_SetString(PyExc_ValueError, "no deflate function or stream");
        goto done;
    }
    if (cb.len % (Py_ssize_t)sizeof(long long) || eb.len / (Py_ssize_t)sizeof(long long) < ncuts
        || dst.len < 1 || (unsigned long long)dst.len > UINT32_MAX
        || (unsigned long long)src.len > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "deflate_job: %zd B of cuts, %zd B of ends, %zd B out, "
                     "%zd B in: not a job", cb.len, eb.len, dst.len, src.len);
        goto done;
    }
    long long prev = 0;
    for (Py_ssize_t i = 0; i < ncuts; i++) {
        if (cuts[i] < prev || cuts[i] > src.len) {
            PyErr_Format(PyExc_ValueError, "deflate_job: cut %zd (%lld) not in order within %zd B",
                         i, cuts[i], src.len);
            goto done;
        }
        prev = cuts[i];
    }
    if (!final && prev != src.len) {
        PyErr_SetString(PyExc_ValueError, "deflate_job: a non-final job must end at a cut");
        goto done;
    }
    if (s->total_out != 0) {
        PyErr_SetString(PyExc_ValueError, "deflate_job: the stream has output already");
        goto done;
    }
    deflate_fn fn = (deflate_fn)(uintptr_t)addr;
    const unsigned char *in = (const unsigned char *)src.buf;
    int status = 0;
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    s->next_out = (unsigned char *)dst.buf;
    s->avail_out = (unsigned int)dst.len;
    prev = 0;
    for (Py_ssize_t i = 0; i <= ncuts; i++) {
        const int last = i == ncuts;
        if (last && !final)
            break;
        const long long end = last ? (long long)src.len : cuts[i];
        if (end == prev && !last) {
            /* An empty segment: as zlib.compressobj's compress(b"") then flush (the flush is
             * then not a repeat, so it emits an empty stored block). */
            s->next_in = NULL;
            s->avail_in = 0;
            status = fn(s, DZ_NO_FLUSH);
            if (status != DZ_OK && status != DZ_BUF_ERROR) { failed = i; break; }
        }
        s->next_in = end > prev ? in + prev : NULL;
        s->avail_in = (unsigned int)(end - prev);
        status = fn(s, last ? DZ_FINISH : DZ_SYNC_FLUSH);
        if (status != (last ? DZ_STREAM_END : DZ_OK)) {
            if (status == DZ_OK)  /* Z_FINISH not done: ``out`` filled */
                status = DJ_FULL;
            failed = i;
            break;
        }
        if (s->avail_in != 0) { status = DJ_INPUT_LEFT; failed = i; break; }
        if (!last && s->avail_out == 0) { status = DJ_FULL; failed = i; break; }
        if (!last)
            ends[i] = (long long)s->total_out;
        prev = end;
        status = 0;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(inK)", status, failed, (unsigned long long)s->total_out);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&cb);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&eb);
    return result;
}

static PyMethodDef methods[] = {
    {"blocks", blocks, METH_VARARGS, blocks_doc},
    {"gear_cuts", gear_cuts, METH_VARARGS, gear_cuts_doc},
    {"deflate_job", deflate_job, METH_VARARGS, deflate_job_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "deltabkp.engine._blockloop",
    "C loops over a whole buffer, the GIL released: deltabkp.engine._blake2's over many blocks, "
    "deltabkp.archive._gzip's cut scan, deltabkp.archive._libz's deflate over a job.", -1, methods,
};

PyMODINIT_FUNC
PyInit__blockloop(void)
{
    return PyModule_Create(&module);
}
