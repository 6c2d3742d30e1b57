"""Averaging and broadcasting CuPy arrays: NCCL when available, else MPI over host copies.

One group (the parameters of one GPU and one dtype) at a time:

* the arrays are used in place when they lie back to back in one allocation
  (contiguous mode on a GPU); otherwise they are packed into a reused device
  buffer with one ``cupy.concatenate`` call and unpacked with one copy per
  array;
* the sum is taken by ``ncclAllReduce`` (float16 gradients as float32, as
  ChainerMN's naive communicator sums them) on the current stream, through
  one NCCL communicator per device, created the first time that device's
  gradients are averaged (rank 0 makes the unique id and broadcasts it over
  MPI); without ``cupy.cuda.nccl`` the buffer is copied to the host, summed
  by MPI and copied back;
* the mean is ``x *= dtype(1.0 / size)`` on the device, in the arrays' dtype
  (float16: rounded to float16 first), as ChainerMN computes it with CuPy.

Every rank must use the same transport (NCCL or not): it is part of the
layout the ranks agree on before anything is sent.
"""
import zlib

import numpy

from cynag import _backend

_F32 = numpy.dtype(numpy.float32)
_F16 = numpy.dtype(numpy.float16)


def _device_id(group):
    return int(group.device.split(":")[1])


class DeviceOps:
    """CuPy side of one :class:`~cynag.multinode.communicator.MpiCommunicator`."""

    def __init__(self, communicator, cupy=None, nccl=None):
        if cupy is None:
            import cupy
        self.cupy = cupy
        if nccl is None:
            try:
                from cupy.cuda import nccl

                if not getattr(nccl, "available", True):
                    nccl = None
            except Exception:
                nccl = None
        self.nccl = nccl
        self.comm = communicator
        self._nccl_comms = {}
        self._buffers = {}

    @property
    def kind(self):
        """How this process moves GPU arrays; part of the layout the ranks agree on."""
        return "gpu (NCCL)" if self.nccl is not None else "gpu (MPI over host copies)"

    def finalize(self):
        for c in self._nccl_comms.values():
            destroy = getattr(c, "destroy", None)
            if destroy is not None:
                destroy()
        self._nccl_comms.clear()
        self._buffers.clear()

    # -- checks ---------------------------------------------------------------
    def prepare(self, group, arrays, zero_fill, mean):
        """As ``MpiCommunicator._prepare`` for a GPU group."""
        from cynag.parameter import _zero_grad
        from cynag.optimizer import _param_label

        active = None
        fixups = []
        what = "grad" if mean else "param"
        for i, a in enumerate(arrays):
            param = group.params[i]
            if a is None:
                if zero_fill:
                    arrays[i] = _zero_grad(param)
                    continue
                if active is None:
                    active = numpy.ones(group.n, bool)
                active[i] = False
                continue
            label = _param_label(param, group.paths[i])
            if _backend.device_of(a) != group.device:
                raise TypeError("%s: %s is a %s but param is a %s; they must be on the same "
                                "device" % (label, what, _backend.describe(a),
                                            _backend.describe(param.array)))
            if a.dtype != group.dtype:
                raise TypeError("%s: %s has dtype %s but param has dtype %s"
                                % (label, what, a.dtype, group.dtype))
            if tuple(a.shape) != tuple(group.shapes[i]):
                raise ValueError("%s: %s has shape %s but param has shape %s"
                                 % (label, what, a.shape, group.shapes[i]))
            if not a.flags.c_contiguous:
                with self.cupy.cuda.Device(_device_id(group)):
                    tmp = self.cupy.ascontiguousarray(a)
                arrays[i] = tmp
                fixups.append((a, tmp))
        return arrays, active, fixups

    # -- helpers ----------------------------------------------------------------
    def _buffer(self, dev, dtype, n):
        key = (dev, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < n:
            buf = self._buffers[key] = self.cupy.empty((n,), dtype)
        return buf[:n]

    def _nccl_comm(self, dev):
        c = self._nccl_comms.get(dev)
        if c is None:
            mpi_comm = self.comm.mpi_comm
            uid = self.nccl.get_unique_id() if mpi_comm.rank == 0 else None
            uid = mpi_comm.bcast(uid, root=0)
            c = self._nccl_comms[dev] = self.nccl.NcclCommunicator(mpi_comm.size, uid,
                                                                   mpi_comm.rank)
        return c

    def _nccl_type(self, dtype):
        nccl = self.nccl
        return {_F16: nccl.NCCL_FLOAT16, _F32: nccl.NCCL_FLOAT32,
                numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64}[numpy.dtype(dtype)]

    @staticmethod
    def _run(arrays, idx, dtype):
        """A 1-d view covering ``arrays[idx]`` if they lie back to back, in this order, in one
        buffer (the views of contiguous mode); else None."""
        first = arrays[idx[0]]
        base = getattr(first, "base", None)
        if base is None or base.dtype != dtype or not base.flags.c_contiguous:
            return None
        start = pos = first.data.ptr
        for i in idx:
            a = arrays[i]
            if a.base is not base or a.data.ptr != pos:
                return None
            pos += a.nbytes
        bptr = base.data.ptr
        if (start - bptr) % dtype.itemsize or start < bptr or pos > bptr + base.nbytes:
            return None
        lo = (start - bptr) // dtype.itemsize
        return base.reshape(-1)[lo:lo + (pos - start) // dtype.itemsize]

    def plan(self, group, arrays, active, allow_runs):
        """Which arrays take part and whether they are used in place (``_Plan``)."""
        idx = [i for i in range(group.n) if (active is None or active[i]) and group.sizes[i]]
        region = None
        if idx and allow_runs and group.dtype != _F16:
            region = self._run(arrays, idx, group.dtype)
        return _Plan(idx, region)

    def _pack(self, dev, dtype, arrays, idx):
        total = sum(int(arrays[i].size) for i in idx)
        buf = self._buffer(dev, dtype, total)
        self.cupy.concatenate([arrays[i].reshape(-1) for i in idx], out=buf)
        return buf

    @staticmethod
    def _unpack(buf, arrays, idx):
        off = 0
        for i in idx:
            a = arrays[i]
            n = int(a.size)
            a[...] = buf[off:off + n].reshape(a.shape)
            off += n

    def _allreduce_sum(self, work, dev):
        """``work`` (float32/float64 on device ``dev``) summed over the ranks, in place."""
        comm = self.comm
        if self.nccl is not None:
            stream = self.cupy.cuda.get_current_stream()
            self._nccl_comm(dev).allReduce(work.data.ptr, work.data.ptr, int(work.size),
                                           self._nccl_type(work.dtype), self.nccl.NCCL_SUM,
                                           stream.ptr)
            return
        host = self.cupy.asnumpy(work)
        MPI = comm._MPI
        step = max(1, comm.bucket_bytes // host.dtype.itemsize)
        for lo in range(0, host.size, step):
            comm.mpi_comm.Allreduce(MPI.IN_PLACE, host[lo:lo + step])
        work.set(host)

    def _bcast(self, buf, dev):
        comm = self.comm
        if self.nccl is not None:
            stream = self.cupy.cuda.get_current_stream()
            self._nccl_comm(dev).bcast(buf.data.ptr, int(buf.size), self._nccl_type(buf.dtype),
                                       0, stream.ptr)
            return
        host = self.cupy.asnumpy(buf)
        comm.mpi_comm.Bcast([host.reshape(-1).view(numpy.uint8), comm._MPI.BYTE], root=0)
        if comm.rank != 0:
            buf.set(host)

    # -- operations ----------------------------------------------------------------
    def mean(self, group, arrays, plan):
        """Average ``arrays`` (the group's gradients) over the ranks, in place."""
        idx, region = plan.idx, plan.region
        if not idx:
            return
        cp = self.cupy
        dev = _device_id(group)
        dtype = group.dtype
        recip = 1.0 / self.comm.size
        with cp.cuda.Device(dev):
            packed = region is None
            work = self._pack(dev, dtype, arrays, idx) if packed else region
            if dtype == _F16:
                wide = work.astype(_F32)
                self._allreduce_sum(wide, dev)
                work[...] = wide.astype(_F16)
                work *= numpy.float16(recip)
            else:
                self._allreduce_sum(work, dev)
                work *= dtype.type(recip)
            if packed:
                self._unpack(work, arrays, idx)

    def bcast(self, group, arrays, plan):
        """Copy rank 0's ``arrays`` (the group's parameters) into every rank's, in place."""
        idx, region = plan.idx, plan.region
        if not idx:
            return
        cp = self.cupy
        dev = _device_id(group)
        with cp.cuda.Device(dev):
            packed = region is None
            work = self._pack(dev, group.dtype, arrays, idx) if packed else region
            self._bcast(work, dev)
            if packed and self.comm.rank != 0:
                self._unpack(work, arrays, idx)

    def bcast_one(self, a):
        """Broadcast one CuPy array of any dtype from rank 0 (through the host)."""
        comm = self.comm
        host = numpy.ascontiguousarray(self.cupy.asnumpy(a))
        comm.mpi_comm.Bcast([host.reshape(-1).view(numpy.uint8), comm._MPI.BYTE], root=0)
        if comm.rank != 0:
            a.set(host)


class _Plan:
    """The arrays of a GPU group that take part, and the view that covers them (or None)."""

    __slots__ = ("idx", "region", "sig")

    def __init__(self, idx, region):
        self.idx = idx
        self.region = region
        self.sig = zlib.crc32(repr((len(idx), region is not None)).encode())
