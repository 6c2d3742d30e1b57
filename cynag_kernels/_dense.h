/*
 * The header check of the dense (fast) update path, shared by
 * cynag_kernels._nesterov_cpu (its single-tensor fast path and the
 * multi-tensor table) and cynag._step (the optimizer's step table).
 *
 * cynag_dense_type(param, grad, v, grad_written) gives the NumPy type number
 * of the arrays if they qualify, -1 otherwise: exact NumPy arrays (at least
 * 1-d) of one native float dtype (float16/32/64) and one shape, all
 * C-contiguous or all F-contiguous, aligned, in native byte order, pairwise
 * disjoint, param and v writeable (and grad if grad_written: it is divided
 * by a loss scale in place).  Reads the array headers only.  0-d arrays are
 * refused: NumPy 1.x promotes them like scalars.
 *
 * The including module must have called import_array().
 */
#ifndef CYNAG_DENSE_H
#define CYNAG_DENSE_H

#include <Python.h>
#include <numpy/arrayobject.h>

static inline int cynag_same_layout(PyArrayObject *a, PyArrayObject *b, int type_num)
{
    int i, nd = PyArray_NDIM(a);
    if (PyArray_TYPE(b) != type_num || PyArray_NDIM(b) != nd)
        return 0;
    for (i = 0; i < nd; i++)
        if (PyArray_DIMS(a)[i] != PyArray_DIMS(b)[i])
            return 0;
    return 1;
}

static inline int cynag_disjoint(const char *a, const char *b, Py_ssize_t nbytes)
{
    return a + nbytes <= b || b + nbytes <= a;
}

static inline int cynag_dense_type(PyObject *param, PyObject *grad, PyObject *v,
                                   int grad_written)
{
    PyArrayObject *p, *g, *vv;
    int type_num, flag;
    Py_ssize_t nbytes;
    if (!(PyArray_CheckExact(param) && PyArray_CheckExact(grad) && PyArray_CheckExact(v)))
        return -1;
    p = (PyArrayObject *)param;
    g = (PyArrayObject *)grad;
    vv = (PyArrayObject *)v;
    if (PyArray_NDIM(p) == 0)
        return -1;
    type_num = PyArray_TYPE(p);
    if (type_num != NPY_FLOAT && type_num != NPY_DOUBLE && type_num != NPY_HALF)
        return -1;
    if (!(cynag_same_layout(p, g, type_num) && cynag_same_layout(p, vv, type_num)))
        return -1;
    flag = NPY_ARRAY_C_CONTIGUOUS;
    if (!(PyArray_CHKFLAGS(p, flag) && PyArray_CHKFLAGS(g, flag) && PyArray_CHKFLAGS(vv, flag))) {
        flag = NPY_ARRAY_F_CONTIGUOUS;
        if (!(PyArray_CHKFLAGS(p, flag) && PyArray_CHKFLAGS(g, flag)
              && PyArray_CHKFLAGS(vv, flag)))
            return -1;
    }
    if (!(PyArray_ISWRITEABLE(p) && PyArray_ISWRITEABLE(vv) && PyArray_ISALIGNED(p)
          && PyArray_ISALIGNED(g) && PyArray_ISALIGNED(vv) && PyArray_ISNOTSWAPPED(p)
          && PyArray_ISNOTSWAPPED(g) && PyArray_ISNOTSWAPPED(vv)))
        return -1;
    if (grad_written && !PyArray_ISWRITEABLE(g))
        return -1;
    nbytes = PyArray_SIZE(p) * PyArray_ITEMSIZE(p);
    if (nbytes && !(cynag_disjoint(PyArray_DATA(p), PyArray_DATA(g), nbytes)
                    && cynag_disjoint(PyArray_DATA(p), PyArray_DATA(vv), nbytes)
                    && cynag_disjoint(PyArray_DATA(g), PyArray_DATA(vv), nbytes)))
        return -1;
    return type_num;
}

#endif
