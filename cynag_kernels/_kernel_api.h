/*
 * The CPU kernel's C entry, for native callers that read their arrays
 * themselves (cynag._step, the optimizer's one-call step, and cynag.torch's
 * reader): cynag_kernels._nesterov_cpu.kernel_api() returns a capsule named
 * CYNAG_KERNEL_API_NAME holding a pointer to this struct.  A change of the
 * layout changes the name.  (cynag/_torch_native.py puts this header in front
 * of cynag/_torch_native.cpp, which is compiled apart from the package.)
 *
 * Tables: ptrs 3 int64 per row (addresses of param, grad, v), coef
 * N_COEF = 6 float64 per row (cynag_nag_coefficients), cum the cumulative
 * element counts (cum[0] = 0), ops CYNAG_OP_WORDS = 4 float64 per operation.
 */
#ifndef CYNAG_KERNEL_API_H
#define CYNAG_KERNEL_API_H

#include <Python.h>
#include <stdint.h>

#define CYNAG_KERNEL_API_NAME "cynag_kernels._nesterov_cpu.kernel_api_v3"

typedef struct {
    int n_coef;      /* columns of a coefficient row (6) */
    int n_op_words;  /* columns of an operation row (4) */
    /* cynag_nag_coefficients (_nag_coef.h): 1 if the kernel takes them. */
    int (*coefficients)(int type_num, double lr, double m, int has_ls, double ls,
                        double* out);
    /* cynag_weight_decay_row (_hook_ops.h): 1 if the kernel takes it. */
    int (*weight_decay)(int type_num, double rate, double* out);
    /* The first m rows of a compacted table: 0; -1 out of memory (only past
     * 256 threads); -2 a type number the kernel does not take.  Nothing
     * changed unless 0. */
    int (*run_table)(const int64_t* ptrs, const int64_t* cum, const double* coef,
                     Py_ssize_t m, int type_num, int n_threads, int items_per_thread,
                     int item_align, const double* ops, int n_ops, int keep_grad);
    /* The rows i in [lo, hi) with mask[i] == select and type_nums[i] ==
     * type_num, empty rows dropped and adjacent runs merged, into a
     * compacted table (room for hi - lo rows): the number of rows written,
     * -2 for a type number the kernel does not take. */
    Py_ssize_t (*compact)(const int64_t* ptrs, const int64_t* sizes, const double* coef,
                          const uint8_t* mask, int select, const int32_t* type_nums,
                          int type_num, Py_ssize_t lo, Py_ssize_t hi, int64_t* out_ptrs,
                          int64_t* out_cum, double* out_coef);
} cynag_kernel_api;

#endif
