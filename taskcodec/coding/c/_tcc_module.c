/* taskcodec.coding._tcc: the Python binding of taskcodec_coder.c (built at install time by setup.py; optional:
 * without a C compiler taskcodec.coding falls back to its pure numpy/Python coder, which writes the same bytes). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "taskcodec_coder.h"

typedef struct {
    PyObject_HEAD
    PyObject *lower, *length, *cdf; /* bytes objects owning the native arrays */
    tcc_tables t;
    size_t max_bytes;
} CoderObject;

static PyObject *CoderError; /* ValueError subclass raised for undecodable payloads */

static void Coder_dealloc(CoderObject *self)
{
    Py_XDECREF(self->lower);
    Py_XDECREF(self->length);
    Py_XDECREF(self->cdf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Coder_init(CoderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lower", "length", "cdf", "stride", "precision", NULL};
    PyObject *lower, *length, *cdf;
    unsigned int stride, precision;
    Py_ssize_t dim;
    int rc;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SSSII", kwlist, &lower, &length, &cdf, &stride, &precision))
        return -1;
    dim = PyBytes_GET_SIZE(lower) / 4;
    if (PyBytes_GET_SIZE(lower) % 4 || PyBytes_GET_SIZE(length) != 4 * dim ||
        PyBytes_GET_SIZE(cdf) != 4 * dim * (Py_ssize_t)stride || dim < 1 || dim > (Py_ssize_t)TCC_MAX_DIM) {
        PyErr_SetString(PyExc_ValueError, "inconsistent table sizes (native int32/uint32 bytes expected)");
        return -1;
    }
    Py_INCREF(lower);
    Py_INCREF(length);
    Py_INCREF(cdf);
    Py_XSETREF(self->lower, lower);
    Py_XSETREF(self->length, length);
    Py_XSETREF(self->cdf, cdf);
    self->t.dim = (uint32_t)dim;
    self->t.stride = stride;
    self->t.precision = precision;
    self->t.lower = (const int32_t *)PyBytes_AS_STRING(lower);
    self->t.length = (const uint32_t *)PyBytes_AS_STRING(length);
    self->t.cdf = (const uint32_t *)PyBytes_AS_STRING(cdf);
    rc = tcc_tables_check(&self->t);
    if (rc) {
        PyErr_Format(PyExc_ValueError, "entropy tables refused by the C coder: %s", tcc_strerror(rc));
        return -1;
    }
    self->max_bytes = tcc_max_bytes(&self->t) + TCC_CHECK_BYTES;
    return 0;
}

/* encode(symbols: int32 buffer [dim], tag: bytes | None) -> bytes; tag None: range-coded bytes without the check */
static PyObject *Coder_encode(CoderObject *self, PyObject *args)
{
    Py_buffer sym;
    PyObject *tag, *out;
    uint8_t stack[1024];
    uint8_t *buf = stack;
    size_t n = 0;
    int rc;
    if (!self->cdf) {
        PyErr_SetString(PyExc_RuntimeError, "Coder not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*O", &sym, &tag))
        return NULL;
    if (sym.len != (Py_ssize_t)(4 * (size_t)self->t.dim) || (tag != Py_None && !PyBytes_Check(tag))) {
        PyBuffer_Release(&sym);
        PyErr_Format(PyExc_ValueError, "expected %u int32 symbols and a bytes tag", self->t.dim);
        return NULL;
    }
    if (self->max_bytes > sizeof stack && !(buf = PyMem_Malloc(self->max_bytes))) {
        PyBuffer_Release(&sym);
        return PyErr_NoMemory();
    }
    if (tag == Py_None)
        rc = tcc_encode(&self->t, (const int32_t *)sym.buf, buf, self->max_bytes, &n);
    else
        rc = tcc_payload_encode(&self->t, (const int32_t *)sym.buf, (const uint8_t *)PyBytes_AS_STRING(tag),
                                (size_t)PyBytes_GET_SIZE(tag), buf, self->max_bytes, &n);
    PyBuffer_Release(&sym);
    out = rc ? NULL : PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n);
    if (rc)
        PyErr_Format(PyExc_RuntimeError, "C coder failed: %s", tcc_strerror(rc));
    if (buf != stack)
        PyMem_Free(buf);
    return out;
}

/* decode(data: bytes-like, tag: bytes | None) -> bytearray of dim native int32; raises CoderError */
static PyObject *Coder_decode(CoderObject *self, PyObject *args)
{
    Py_buffer data;
    PyObject *tag, *out;
    int rc;
    if (!self->cdf) {
        PyErr_SetString(PyExc_RuntimeError, "Coder not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*O", &data, &tag))
        return NULL;
    if (tag != Py_None && !PyBytes_Check(tag)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_TypeError, "tag must be bytes or None");
        return NULL;
    }
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(4 * (size_t)self->t.dim));
    if (!out) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (tag == Py_None)
        rc = tcc_decode(&self->t, (const uint8_t *)data.buf, (size_t)data.len, (int32_t *)PyByteArray_AS_STRING(out));
    else
        rc = tcc_payload_decode(&self->t, (const uint8_t *)data.buf, (size_t)data.len,
                                (const uint8_t *)PyBytes_AS_STRING(tag), (size_t)PyBytes_GET_SIZE(tag),
                                (int32_t *)PyByteArray_AS_STRING(out));
    PyBuffer_Release(&data);
    if (rc) {
        Py_DECREF(out);
        PyErr_SetObject(CoderError, Py_BuildValue("(is)", rc, tcc_strerror(rc)));
        return NULL;
    }
    return out;
}

static PyMethodDef Coder_methods[] = {
    {"encode", (PyCFunction)Coder_encode, METH_VARARGS, "encode(symbols_int32, tag_or_None) -> bytes"},
    {"decode", (PyCFunction)Coder_decode, METH_VARARGS, "decode(data, tag_or_None) -> bytearray (int32)"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject CoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "taskcodec.coding._tcc.Coder",
    .tp_basicsize = sizeof(CoderObject),
    .tp_dealloc = (destructor)Coder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C range coder bound to one set of integer CDF tables.",
    .tp_methods = Coder_methods,
    .tp_init = (initproc)Coder_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tcc", "taskcodec-range56 coder (C)", -1, NULL};

PyMODINIT_FUNC PyInit__tcc(void)
{
    PyObject *m;
    if (PyType_Ready(&CoderType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (!m)
        return NULL;
    CoderError = PyErr_NewException("taskcodec.coding._tcc.CoderError", PyExc_ValueError, NULL);
    Py_INCREF(&CoderType);
    if (!CoderError || PyModule_AddObject(m, "Coder", (PyObject *)&CoderType) < 0 ||
        PyModule_AddObject(m, "CoderError", CoderError) < 0 ||
        PyModule_AddStringConstant(m, "CODER_NAME", TCC_CODER_NAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
