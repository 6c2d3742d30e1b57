# Shared with cynag._step: the header check of the dense (fast) update path.
cdef int dense_type(object param, object grad, object v, bint grad_written) noexcept
