/* deltabkp.engine._blockloop: the loop of deltabkp/engine/_blake2.py over many blocks, in C.
 *
 * Why: a ctypes call holds the GIL ~1.2 us per block around the library's BLAKE2b, and
 * with helper threads hashing at once every block hands the GIL back and forth.  Here one
 * call hashes a whole task's blocks with the GIL released, so the threads run side by side.
 *
 * The hash itself stays the library's (libsodium or libb2, loaded and checked against
 * hashlib by _blake2.py, which passes the checked function's address): this module has no
 * hash of its own, no link-time dependency and no header beyond Python's.  It is optional:
 * without a compiler the package installs without it and _blake2.py loops through ctypes.
 *
 * Invariants: every bound is checked before a pointer is formed (the caller's buffers are
 * held through the buffer protocol for the whole loop); the loop stops at the first status
 * other than 0 and reports that block, whose digest must not be used.
 */
/* The stable ABI of 3.11 (Py_buffer joined it then): one wheel for every later CPython. */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

static PyMethodDef methods[] = {
    {"blocks", blocks, METH_VARARGS, blocks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "deltabkp.engine._blockloop",
    "One C loop over many blocks for deltabkp.engine._blake2 (the GIL released).", -1, methods,
};

PyMODINIT_FUNC
PyInit__blockloop(void)
{
    return PyModule_Create(&module);
}
