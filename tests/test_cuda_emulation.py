"""The CUDA kernels (nesterov_ag.cu, hooks.cu), run without a GPU by a host-compiler emulator.

The very source the GPU launcher hands to NVRTC
(:func:`cynag_kernels.cuda.kernel_source`) is compiled with the host C++
compiler::

    g++ -std=c++17 -O1 -ffp-contract=off -fPIC -shared
        -I tests/cuda_emulator -include tests/cuda_emulator/cuda_emu_prelude.h

into a shared library loaded with ctypes.  The prelude turns ``__global__``
functions into plain functions and ``threadIdx``/``blockIdx``/``blockDim``/
``gridDim`` into thread-local values; ``tests/cuda_emulator/cuda_fp16.h``
provides ``__half`` over ``_Float16``; for every ``extern "C" __global__``
entry point a launcher (generated below, in the same translation unit as the
kernels, with ``tests/cuda_emulator/cuda_emu_driver.h``) runs every block and
every thread of a launch one after the other, blocks in a given order.

The arguments are the tuple :func:`cynag_kernels.cuda.kernel_args` builds for
CuPy, with NumPy arrays in place of CuPy arrays; each argument must have
exactly the C type of the kernel parameter (parsed from the source, and the
parse checked by the compiler, see :func:`_generated_launchers`), as CuPy would
otherwise pass the wrong bytes.  Arrays live between guard regions filled with
a sentinel bit pattern, so that any write out of bounds is seen.

What the tests establish, for all three entry points:

* the results equal, bit for bit, Chainer's kernel arithmetic evaluated in
  NumPy without fused multiply-adds (:func:`oracle_step`), over sizes that
  make the grid-stride loop wrap many times, several hyperparameters and
  steps, special values included;
* they do not depend on the order in which blocks (and threads) run;
* :func:`cynag_kernels.cuda.launch_config` makes every element updated exactly
  once, for many sizes, multiprocessor counts and block sizes, and nothing
  outside the arrays is written;
* the harness itself works: a Python float, an ``int32`` ``n`` or a float64
  array is rejected, a wrong ``n`` is reported as damaged guards, constructs
  the emulator cannot run (``__syncthreads``, ``__shared__``, atomics, warp
  shuffles, ...) fail to compile with a message naming them, and mutated
  copies of the kernel (wrong stride, wrong bound, reassociated arithmetic)
  are caught.

For the multi-tensor entry points (``MULTI_KERNEL_NAMES``), with the table
of :func:`cynag_kernels.cuda.multi_table` and the coefficients of
:func:`~cynag_kernels.cuda.multi_coefficients`:

* one launch gives, bit for bit, what the single-tensor kernel gives tensor
  by tensor after ``grad / loss_scale`` in the array dtype, for random
  tables (sizes 1 and up, around the work item size, one large tensor,
  per-tensor lr and momentum, some loss scales), for grids of
  :func:`~cynag_kernels.cuda.multi_launch_config`, several block and work
  item sizes, blocks and threads in several orders;
* every element is updated (and its gradient divided) exactly once, and
  nothing outside the arrays is written; mutated copies are caught.

The launcher and the optimizer run on an emulated CuPy (:class:`FakeCupy`,
installed as ``sys.modules['cupy']`` for one test): arrays are NumPy arrays
said to be on device 0 or 1, ``RawModule`` functions run the emulated
kernels and count launches, and a launch whose arrays or table pointers are
not on the current device fails.  ``NesterovAG.update()`` on models of 1 to
300 parameters launches, after the first step, one kernel per (device,
dtype) group plus one per parameter left to the per-parameter path, with
results equal bit for bit to ``use_multi_tensor(False)``.

For the kernels of the optimizer hooks (``hooks.cu``):

* ``HOOK_KERNEL_NAMES``: the gradient after a program of rows
  (:func:`cynag_kernels.hooks.op_row`) equals, bit for bit,
  :func:`cynag_kernels.hooks.apply_ops` on the CPU, for float16/32/64, every
  kind alone and random programs of several operations, values and
  coefficients with NaN, signed zeros, infinities, subnormals and extremes,
  clip bounds one- or two-sided, crossed, NaN or beyond the dtype's range,
  every float16 bit pattern, several grids and block orders; every element is
  updated once, ``p`` and the rows are not written;
* ``SUM_SQUARES_KERNEL_NAMES`` and ``SUM_SQUARES_MULTI_KERNEL_NAMES``: every
  partial sum is written, and their sum is the exact float64 sum of squares
  to 1e-12 (ones: the element count exactly), for single arrays and tables;
* mutated copies are caught;
* :func:`~cynag_kernels.cuda.hook_ops_gpu` and
  :func:`~cynag_kernels.cuda.sum_squares_gpu` on the emulated CuPy: one launch
  per call (per dtype for the sum, then one ``cupy.sum``), apply_ops's bits in
  every layout and with aliasing, the programs copied to a device once.

What it does not establish: NVRTC compiles with ``--fmad=true`` by default, so
a GPU contracts ``a * b + c`` into fused multiply-adds and agrees with these
results to rounding, not bit for bit (as the source says); and nothing here
runs on a GPU (tests/test_gpu.py does, where there is one).

Skipped only when no C++ compiler with ``_Float16`` is found (``$CXX``, else
``g++``, ``c++``, ``clang++``).
"""
import ctypes
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
from collections import namedtuple

import numpy as np
import pytest

import cynag
from cynag_kernels import cuda as cuda_launcher
from cynag_kernels import hooks as cpu_hooks
from cynag_kernels import nesterov_ag_coefficients

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulator")
PRELUDE = os.path.join(EMU_DIR, "cuda_emu_prelude.h")
CXX_FLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Every entry point table of the launcher (the module holds exactly these kernels).
ALL_NAME_TABLES = (cuda_launcher.KERNEL_NAMES, cuda_launcher.MULTI_KERNEL_NAMES,
                   cuda_launcher.HOOK_KERNEL_NAMES, cuda_launcher.SUM_SQUARES_KERNEL_NAMES,
                   cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES,
                   cuda_launcher.MULTI_OPS_KERNEL_NAMES)


# ---------------------------------------------------------------------------
# Compiler
# ---------------------------------------------------------------------------
def _find_cxx():
    """``(argv, None)`` for a C++ compiler with ``_Float16``, or ``(None, reason)``."""
    candidates = []
    if os.environ.get("CXX"):
        candidates.append(shlex.split(os.environ["CXX"]))
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            candidates.append([path])
    if not candidates:
        return None, "no C++ compiler found ($CXX, g++, c++, clang++)"
    probe = "_Float16 h(float f) { return static_cast<_Float16>(f); }\n"
    problems = []
    tmp = tempfile.mkdtemp(prefix="cynag-cuda-emu-probe-")
    try:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(probe)
        for argv in candidates:
            try:
                proc = subprocess.run(argv + list(CXX_FLAGS) + [src, "-o",
                                                                os.path.join(tmp, "probe.so")],
                                      capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                problems.append("%s: %s" % (" ".join(argv), e))
                continue
            if proc.returncode == 0:
                return argv, None
            problems.append("%s: %s" % (" ".join(argv), proc.stderr.strip()[-300:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None, ("no C++ compiler supporting _Float16 with %s: %s"
                  % (" ".join(CXX_FLAGS), "; ".join(problems)))


_CXX, _CXX_PROBLEM = _find_cxx()


@pytest.fixture(scope="module")
def cxx():
    if _CXX is None:
        pytest.skip(_CXX_PROBLEM)
    missing = [f for f in ("cuda_emu_prelude.h", "cuda_emu_driver.h", "cuda_fp16.h")
               if not os.path.isfile(os.path.join(EMU_DIR, f))]
    if missing:  # e.g. tests run from an sdist whose MANIFEST.in leaves out tests/**/*.h
        pytest.fail("the emulator headers %s are missing from %s" % (missing, EMU_DIR))
    return _CXX


# ---------------------------------------------------------------------------
# Kernel signatures, parsed from the source
# ---------------------------------------------------------------------------
#: C parameter of a kernel: ``base`` C type, pointer or not, pointee const or not.
Param = namedtuple("Param", "name base pointer const")

#: NumPy scalar dtype and ctypes type of a by-value parameter.
SCALAR_CTYPES = {
    "float": (np.dtype(np.float32), ctypes.c_float),
    "double": (np.dtype(np.float64), ctypes.c_double),
    "long long": (np.dtype(np.int64), ctypes.c_longlong),
    "unsigned long long": (np.dtype(np.uint64), ctypes.c_ulonglong),
    "int": (np.dtype(np.int32), ctypes.c_int),
    "unsigned int": (np.dtype(np.uint32), ctypes.c_uint),
}

#: NumPy dtype of the elements a pointer parameter points to.
POINTEE_DTYPES = {
    "__half": np.dtype(np.float16),
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "long long": np.dtype(np.int64),
    "int": np.dtype(np.int32),
    "unsigned int": np.dtype(np.uint32),
}

#: Macros whose use would make the host build compile other code than NVRTC does.
_DEVICE_ONLY_MACROS = ("__CUDA_ARCH__", "__CUDACC__", "__CUDACC_RTC__", "__NVCC__")

_TOKEN_RE = re.compile(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/', re.S)
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_]\w*)\s*\(([^()]*)\)\s*\{')


class EmulatorUnsupported(Exception):
    """The source uses something the emulator cannot reproduce."""


class EmulatorCompileError(Exception):
    """The host compiler rejected the source; the message holds its output."""


class KernelArgumentError(TypeError):
    """An argument does not have the exact C type of the kernel parameter."""


class EmulatedLaunchError(RuntimeError):
    """The launch itself was invalid (dimensions or orders)."""


def _strip_comments(source):
    return _TOKEN_RE.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", source)


def _parse_param(text, kernel):
    words = re.sub(r"\b(__restrict__|__restrict)\b", " ", text).replace("*", " * ").split()
    if len(words) < 2 or not re.match(r"^[A-Za-z_]\w*$", words[-1]):
        raise EmulatorUnsupported("kernel %s: cannot parse parameter %r (a name is needed)"
                                  % (kernel, text.strip()))
    name, type_words = words[-1], words[:-1]
    stars = type_words.count("*")
    if stars > 1:
        raise EmulatorUnsupported("kernel %s: parameter %r: pointers to pointers are not supported"
                                  % (kernel, text.strip()))
    if stars == 1:
        k = type_words.index("*")
        if type_words[k + 1:] not in ([], ["const"]):  # T* const p: top-level, ignored
            raise EmulatorUnsupported("kernel %s: cannot parse parameter %r" % (kernel, text.strip()))
        type_words = type_words[:k]
    const = "const" in type_words
    base = " ".join(w for w in type_words if w != "const")
    base = {"long long int": "long long", "signed long long": "long long",
            "unsigned": "unsigned int", "unsigned long long int": "unsigned long long"}.get(base, base)
    table = POINTEE_DTYPES if stars else SCALAR_CTYPES
    if base not in table:
        raise EmulatorUnsupported("kernel %s: parameter %r has a type the emulator does not marshal "
                                  "(%s%s)" % (kernel, text.strip(), base, " *" if stars else ""))
    if const and not stars:
        const = False  # const by-value parameter: same C type
    return Param(name, base, bool(stars), const)


def parse_kernels(source):
    """``{name: [Param, ...]}`` of the ``extern "C" __global__`` entry points, in source order."""
    code = _strip_comments(source)
    kernels = {}
    for m in _KERNEL_RE.finditer(code):
        name, params = m.group(1), m.group(2).strip()
        if name in kernels:
            raise EmulatorUnsupported("kernel %s is defined twice" % name)
        kernels[name] = [] if params in ("", "void") else [
            _parse_param(p, name) for p in params.split(",")]
    n_global = len(re.findall(r"\b__global__\b", code))
    if n_global != len(kernels):
        raise EmulatorUnsupported(
            "the source has %d __global__ functions but %d are 'extern \"C\" __global__ void "
            "NAME(...) {' definitions the emulator can launch" % (n_global, len(kernels)))
    return kernels


def _c_decl(p, cname):
    return "%s%s%s %s" % ("const " if p.const else "", p.base, "*" if p.pointer else "", cname)


def _generated_launchers(kernels):
    """C++ launchers for the kernels, appended to the kernel source.

    Each kernel is first redeclared with the parsed parameter types: an
    ``extern "C"`` function redeclared with other parameter types is a
    compile error ("conflicting declaration of C function"), so a library
    that builds is one whose marshalling table matches the source exactly.
    """
    out = ['#line 1 "<cynag emulator: generated launchers>"', '#include "cuda_emu_driver.h"']
    for name, params in kernels.items():
        decl = ", ".join(_c_decl(p, "a%d" % i) for i, p in enumerate(params))
        call = ", ".join("a%d" % i for i in range(len(params)))
        out.append('extern "C" __global__ void %s(%s);' % (name, decl or "void"))
        out.append('extern "C" int cynag_emu_launch__%s(const long long* dims, '
                   'const long long* block_order, const long long* thread_order%s) {'
                   % (name, "".join(", " + _c_decl(p, "a%d" % i) for i, p in enumerate(params))))
        out.append("    return ::cynag_emu::launch(dims, block_order, thread_order, "
                   "[&]() { %s(%s); });" % (name, call))
        out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Build and launch
# ---------------------------------------------------------------------------
_LAUNCH_ERRORS = {
    1: "grid dimensions outside CUDA's limits",
    2: "block dimensions outside CUDA's limits (at most 1024 threads, z at most 64)",
    3: "block_order is not a permutation of the blocks",
    4: "thread_order is not a permutation of a block's threads",
    5: "more threads than the emulator runs (2**31)",
}


class Emulator:
    """The kernels of one source, compiled for the host and launchable from Python."""

    def __init__(self, lib, kernels, compiler_output):
        self.lib = lib
        self.kernels = kernels
        self.compiler_output = compiler_output
        self._functions = {}
        for name, params in kernels.items():
            fn = getattr(lib, "cynag_emu_launch__" + name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 3 + [
                ctypes.c_void_p if p.pointer else SCALAR_CTYPES[p.base][1] for p in params]
            self._functions[name] = fn

    def marshal(self, name, args):
        """ctypes values for ``args``, each checked against the kernel's C parameter type."""
        params = self.kernels[name]
        if len(args) != len(params):
            raise KernelArgumentError("%s takes %d arguments, got %d"
                                      % (name, len(params), len(args)))
        out = []
        for i, (p, a) in enumerate(zip(params, args)):
            where = "%s argument %d (%s %s)" % (name, i, _c_decl(p, "").strip(), p.name)
            if p.pointer:
                want = POINTEE_DTYPES[p.base]
                if not isinstance(a, np.ndarray):
                    raise KernelArgumentError("%s: needs a numpy.ndarray of %s, got %s"
                                              % (where, want, type(a).__name__))
                if a.dtype != want:
                    raise KernelArgumentError("%s: needs dtype %s, got an array of %s"
                                              % (where, want, a.dtype))
                if not (a.flags.c_contiguous and a.flags.aligned):
                    raise KernelArgumentError("%s: the array must be C-contiguous and aligned "
                                              "(a kernel ignores strides)" % where)
                if not p.const and not a.flags.writeable:
                    raise KernelArgumentError("%s: the kernel writes through this pointer but "
                                              "the array is read-only" % where)
                out.append(ctypes.c_void_p(a.ctypes.data))
            else:
                want, ctype = SCALAR_CTYPES[p.base]
                if (not isinstance(a, np.generic) or isinstance(a, np.bool_)
                        or a.dtype != want):
                    raise KernelArgumentError(
                        "%s: needs a numpy.%s scalar, got %s.%s %r (CuPy would pass other bytes)"
                        % (where, want.type.__name__, type(a).__module__, type(a).__qualname__, a))
                out.append(ctype(a.item()))
        return out

    def launch(self, name, grid, block, args, block_order=None, thread_order=None):
        """Run ``name<<<grid, block>>>(*args)``, blocks in ``block_order`` (None: 0, 1, ...)."""
        cargs = self.marshal(name, args)
        g, b = _dims(grid, "grid"), _dims(block, "block")
        dims = np.array(g + b, np.int64)
        keep = [dims]

        def order(o, count):
            if o is None:
                return None
            o = np.ascontiguousarray(o, dtype=np.int64)
            if o.shape != (count,):
                raise EmulatedLaunchError("an order of %d indices is needed, got shape %s"
                                          % (count, o.shape))
            keep.append(o)
            return o.ctypes.data

        nblocks = g[0] * g[1] * g[2]
        nthreads = b[0] * b[1] * b[2]
        rc = self._functions[name](dims.ctypes.data, order(block_order, nblocks),
                                   order(thread_order, nthreads), *cargs)
        if rc:
            raise EmulatedLaunchError("%s<<<%s, %s>>>: %s"
                                      % (name, g, b, _LAUNCH_ERRORS.get(rc, "error %d" % rc)))


def _dims(d, what):
    if isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)):
        d = (d,)
    if not isinstance(d, tuple) or not 1 <= len(d) <= 3 or not all(
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in d):
        raise EmulatedLaunchError("%s must be an int or a tuple of 1 to 3 ints, got %r" % (what, d))
    d = tuple(int(x) for x in d) + (1,) * (3 - len(d))
    if min(d) < 1:
        raise EmulatedLaunchError("%s dimensions must be positive, got %r" % (what, d))
    return d


_build_count = [0]


def build(cxx, source, tamper=None):
    """Compile ``source`` for the host and load it; the build directory is removed at once.

    ``tamper`` (tests of the harness only) edits the parsed signatures before
    the launchers are generated.
    """
    code = _strip_comments(source)
    for macro in _DEVICE_ONLY_MACROS:
        if re.search(r"\b%s\b" % macro, code):
            raise EmulatorUnsupported(
                "cynag emulator: the source tests %s; the host build would compile other code "
                "than NVRTC does" % macro)
    kernels = parse_kernels(source)
    if tamper is not None:
        kernels = tamper(kernels)
    tmp = tempfile.mkdtemp(prefix="cynag-cuda-emu-")
    try:
        kernel_file = os.path.join(tmp, "kernel.cu")
        with open(kernel_file, "w") as f:
            f.write(source)
        main = os.path.join(tmp, "emulated.cpp")
        with open(main, "w") as f:
            f.write('#include "kernel.cu"\n' + _generated_launchers(kernels))
        _build_count[0] += 1
        lib_path = os.path.join(tmp, "emulated_%d_%d.so" % (os.getpid(), _build_count[0]))
        cmd = list(cxx) + list(CXX_FLAGS) + ["-Wall", "-I", EMU_DIR, "-include", PRELUDE,
                                             "-x", "c++", main, "-o", lib_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise EmulatorCompileError("%s\n%s%s" % (" ".join(cmd), proc.stdout, proc.stderr))
        lib = ctypes.CDLL(lib_path)  # stays mapped after the directory is removed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Emulator(lib, kernels, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def emu(cxx):
    return build(cxx, cuda_launcher.kernel_source())


# ---------------------------------------------------------------------------
# Guarded arrays, orders, oracle
# ---------------------------------------------------------------------------
GUARD = 64
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Guard fill: NaNs with a payload no arithmetic produces.
SENTINEL = {2: 0x7D5A, 4: 0x7FA5A5A5, 8: 0x7FF5A5A5A5A5A5A5}


def _bits(a):
    return a.view(_UINT[a.dtype.itemsize])


class Guarded:
    """``values`` (1-d) copied between two guards of :data:`GUARD` sentinel elements."""

    def __init__(self, values):
        values = np.asarray(values).reshape(-1)
        self.n = values.size
        self.buf = np.empty(self.n + 2 * GUARD, values.dtype)
        _bits(self.buf)[...] = SENTINEL[values.dtype.itemsize]
        self.array = self.buf[GUARD:GUARD + self.n]
        self.array[...] = values

    def damage(self):
        """Offsets (relative to the array: negative before it, >= n after it) of changed guards."""
        bits = _bits(self.buf)
        s = SENTINEL[self.buf.dtype.itemsize]
        before = np.nonzero(bits[:GUARD] != s)[0] - GUARD
        after = np.nonzero(bits[GUARD + self.n:] != s)[0] + self.n
        return [int(k) for k in np.concatenate([before, after])]


def orders(rng, grid, block):
    """(label, block_order, thread_order): forward, reversed, and a random permutation of both."""
    nb = int(np.prod(grid))
    nt = int(np.prod(block))
    return [("forward", None, None),
            ("reversed", np.arange(nb)[::-1], np.arange(nt)[::-1]),
            ("random", rng.permutation(nb), rng.permutation(nt))]


def oracle_step(param, grad, v, lr, momentum):
    """Chainer's GPU kernel arithmetic, each operation rounded, no FMA: ``(param, v)`` after.

    ``lr`` and ``momentum`` are the kernel's scalar arguments (float32 for
    float16 arrays).  float16 computes in float32; ``v`` is stored as float16
    before the parameter update reads it back.
    """
    dtype = param.dtype
    c = np.float32 if dtype == np.float16 else dtype.type
    assert type(lr) is c and type(momentum) is c
    one = c(1)
    with np.errstate(all="ignore"):
        g = grad.astype(c)
        v_new = (v.astype(c) * momentum - lr * g).astype(dtype)  # float16: RNE
        vv = v_new.astype(c)
        mm = momentum * momentum
        cl = (one + momentum) * lr
        p_new = (param.astype(c) + (mm * vv - cl * g)).astype(dtype)
    return p_new, v_new


def mismatches(actual, expected):
    """Indices where the bit patterns differ (two NaNs of any payload agree)."""
    diff = _bits(actual) != _bits(expected)
    diff &= ~(np.isnan(actual) & np.isnan(expected))
    return np.nonzero(diff.reshape(-1))[0]


def random_values(rng, dtype, n, log10_range, specials=True):
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(*log10_range, size=n)
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    if specials and n >= 32:
        fi = np.finfo(dtype)
        sp = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, fi.smallest_subnormal,
                       -fi.smallest_subnormal, fi.tiny, fi.max, -fi.max], dtype)
        x[rng.choice(n, size=sp.size, replace=False)] = sp
    return x


def random_shape(rng, size):
    if size == 0:
        return (0,) if rng.random() < 0.5 else (3, 0)
    shape = []
    rest = size
    for _ in range(rng.integers(0, 3)):
        divisors = [d for d in range(2, min(rest, 64) + 1) if rest % d == 0]
        if not divisors:
            break
        d = int(rng.choice(divisors))
        shape.append(d)
        rest //= d
    shape.append(rest)
    rng.shuffle(shape)
    return tuple(shape)


LOG10_RANGES = {np.dtype(np.float16): (-5, 3), np.dtype(np.float32): (-8, 6),
                np.dtype(np.float64): (-12, 8)}


def run_step(emu, name, grid, block, p, g, v, lr, momentum, order_list):
    """One launch per order on guarded copies; ``[(label, param, v, guard damage)]``."""
    out = []
    for label, bo, to in order_list:
        P, G, V = Guarded(p), Guarded(g), Guarded(v)
        args = cuda_launcher.kernel_args(P.array, G.array, V.array, lr, momentum)
        emu.launch(name, grid, block, args, block_order=bo, thread_order=to)
        damage = {k: A.damage() for k, A in (("param", P), ("grad", G), ("v", V)) if A.damage()}
        if _bits(G.array).tobytes() != _bits(g.reshape(-1)).tobytes():
            damage["grad (const, modified)"] = [-1]
        out.append((label, P.array.copy(), V.array.copy(), damage))
    return out


# ---------------------------------------------------------------------------
# Signatures and marshalling
# ---------------------------------------------------------------------------
def test_signatures_match_the_launcher_tables():
    """The parsed entry points are exactly those of the launcher's tables, with their C types.

    Single-tensor kernels: ``(T* param, const T* grad, T* v, S lr, S momentum,
    long long n)``; multi-tensor kernels: ``(const long long* table, const S*
    coef, long long n_tensors, long long n_items)``, with ``S`` the scalar type
    of :data:`SCALAR_TYPES` (what :func:`multi_coefficients` builds).
    """
    kernels = parse_kernels(cuda_launcher.kernel_source())
    assert sorted(kernels) == sorted(n for names in ALL_NAME_TABLES for n in names.values())
    assert sorted(cuda_launcher.KERNEL_NAMES) == sorted(cuda_launcher.MULTI_KERNEL_NAMES) \
        == sorted(DTYPES)
    for dtype, name in cuda_launcher.KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["param", "grad", "v", "lr", "momentum", "n"], name
        for p, const in zip(params[:3], (False, True, False)):
            assert p.pointer and p.const == const and POINTEE_DTYPES[p.base] == dtype, (name, p)
        for p in params[3:5]:
            assert not p.pointer
            assert SCALAR_CTYPES[p.base][0] == np.dtype(cuda_launcher.SCALAR_TYPES[dtype]), (name, p)
        assert not params[5].pointer and params[5].base == "long long"
    for dtype, name in cuda_launcher.MULTI_KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["table", "coef", "n_tensors", "n_items"], name
        table, coef = params[:2]
        assert table.pointer and table.const and table.base == "long long", (name, table)
        assert coef.pointer and coef.const, (name, coef)
        assert POINTEE_DTYPES[coef.base] == np.dtype(cuda_launcher.SCALAR_TYPES[dtype]), (name, coef)
        c, _ = cuda_launcher.multi_coefficients(dtype, [0.01], [0.9])
        assert c.dtype == POINTEE_DTYPES[coef.base], (name, c.dtype)
        for p in params[2:]:
            assert not p.pointer and p.base == "long long", (name, p)
    for dtype, name in cuda_launcher.MULTI_OPS_KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["table", "coef", "n_tensors", "n_items", "ops",
                                            "n_ops"], name
        assert [p.base for p in params[:2]] == [
            "long long", {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[
                np.dtype(cuda_launcher.SCALAR_TYPES[dtype])]], name
        assert params[4].pointer and params[4].const and params[4].base == "double", name
        for p in (params[2], params[3], params[5]):
            assert not p.pointer and p.base == "long long", (name, p)
    _check_hook_signatures(kernels)


def test_kernel_args_scalars_are_the_gpu_coefficients():
    """kernel_args passes lr and momentum rounded to the array dtype, in the kernel's scalar type."""
    for dtype in DTYPES:
        for lr, m in ((0.01, 0.9), (1e-3, 0.99), (0.1, 0.0), (1e-8, 0.123456789), (3, 1)):
            a = np.zeros(5, dtype)
            args = cuda_launcher.kernel_args(a, a.copy(), a.copy(), lr, m)
            assert args[5] == 5 and type(args[5]) is np.int64
            scalar = cuda_launcher.SCALAR_TYPES[dtype]
            assert type(args[3]) is scalar and type(args[4]) is scalar
            assert (args[3], args[4]) == nesterov_ag_coefficients(lr, m, dtype, device="gpu")
            assert args[3] == scalar(dtype.type(lr)) and args[4] == scalar(dtype.type(m))


def test_kernel_args_marshal_and_wrong_types_are_rejected(emu):
    """kernel_args' tuple marshals for every kernel; any argument of another C type is rejected."""
    for dtype, name in cuda_launcher.KERNEL_NAMES.items():
        p, g, v = (np.ones(8, dtype) for _ in range(3))
        args = cuda_launcher.kernel_args(p, g, v, 0.01, 0.9)
        emu.marshal(name, args)

        def rejected(i, value, match):
            bad = list(args)
            bad[i] = value
            with pytest.raises(KernelArgumentError, match=match):
                emu.marshal(name, tuple(bad))

        scalar = cuda_launcher.SCALAR_TYPES[dtype]
        other = np.float64 if scalar is np.float32 else np.float32
        rejected(3, 0.01, "lr")                      # Python float
        rejected(4, other(0.9), "momentum")          # float64 for float (float32 for double)
        rejected(3, np.array(0.01, scalar), "lr")    # 0-d array, not a scalar
        rejected(5, 8, "long long n")                # Python int
        rejected(5, np.int32(8), "long long n")
        rejected(5, np.uint64(8), "long long n")
        rejected(5, np.float64(8), "long long n")
        for wrong in DTYPES:
            if wrong != dtype:
                rejected(0, np.ones(8, wrong), "param.*dtype")
                rejected(1, np.ones(8, wrong), "grad.*dtype")
        rejected(2, np.ones(16, dtype)[::2], "contiguous")
        ro = np.ones(8, dtype)
        ro.flags.writeable = False
        rejected(0, ro, "read-only")
        emu.marshal(name, args[:1] + (ro,) + args[2:])  # const grad may be read-only
        rejected(0, [1.0] * 8, "ndarray")
        with pytest.raises(KernelArgumentError, match="takes 6 arguments"):
            emu.marshal(name, args[:5])
    # The issue's three examples, on the float32 kernel.
    p, g, v = (np.ones(4, np.float32) for _ in range(3))
    args = cuda_launcher.kernel_args(p, g, v, 0.01, 0.9)
    name = cuda_launcher.KERNEL_NAMES[np.dtype(np.float32)]
    for bad in ((p, g, v, 0.01, args[4], args[5]),
                (p, g, v, args[3], args[4], np.int32(4)),
                (p, np.ones(4, np.float64), v, args[3], args[4], args[5])):
        with pytest.raises(KernelArgumentError):
            emu.launch(name, (1,), (32,), bad)
    assert (p == 1).all() and (v == 1).all()


def test_wrong_parsed_signature_does_not_build(cxx):
    """The compiler checks the parsed signatures: a wrong one is a conflicting declaration."""
    def tamper(kernels):
        kernels = dict(kernels)
        name = cuda_launcher.KERNEL_NAMES[np.dtype(np.float32)]
        params = list(kernels[name])
        params[3] = params[3]._replace(base="double")  # lr as double
        params[1] = params[1]._replace(const=False)     # grad non-const
        kernels[name] = params
        return kernels

    with pytest.raises(EmulatorCompileError, match="conflicting declaration"):
        build(cxx, cuda_launcher.kernel_source(), tamper=tamper)


# ---------------------------------------------------------------------------
# The emulator's own pieces
# ---------------------------------------------------------------------------
_CONVERT_SOURCE = r"""
#include <cuda_fp16.h>
extern "C" __global__ void to_half(const float* __restrict__ x, __half* __restrict__ h, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        h[i] = __float2half_rn(x[i]);
}
extern "C" __global__ void to_float(const __half* __restrict__ h, float* __restrict__ x, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        x[i] = __half2float(h[i]);
}
extern "C" __global__ void where_am_i(int* __restrict__ out)
{
    const long long t = ((long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const long long b = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const long long k = b * blockDim.x * blockDim.y * blockDim.z + t;
    out[6 * k + 0] = threadIdx.x; out[6 * k + 1] = threadIdx.y; out[6 * k + 2] = threadIdx.z;
    out[6 * k + 3] = blockIdx.x; out[6 * k + 4] = blockIdx.y; out[6 * k + 5] = blockIdx.z;
}
"""


def test_half_conversions_match_numpy(cxx):
    """The stub's __float2half_rn is round-to-nearest-even (ties, subnormals, overflow), as NumPy's."""
    e = build(cxx, _CONVERT_SOURCE)
    # Every float16 value -> float32.
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = np.empty(h.size, np.float32)
    e.launch("to_float", (64,), (256,), (h, x, np.int64(h.size)))
    assert mismatches(x, h.astype(np.float32)).size == 0
    # float32 -> float16: every half, the midpoints between neighbours (ties) and
    # their float32 neighbours, the overflow threshold, and random bit patterns.
    finite = h[np.isfinite(h)].astype(np.float64)
    finite = np.unique(finite)
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (finite[:-1] + finite[1:]) / 2)  # exact in float32
    rng = np.random.default_rng(1)
    f = np.concatenate([
        finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
        np.nextafter(mids, np.float32(-np.inf)),
        np.array([65504, 65519.996, 65520, -65520, 65536, 1e30, np.inf, -np.inf, np.nan,
                  2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -26, 1e-45], np.float32),
        rng.integers(0, 1 << 32, size=1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])
    out = np.empty(f.size, np.float16)
    e.launch("to_half", (13,), (96,), (f, out, np.int64(f.size)))
    with np.errstate(over="ignore", invalid="ignore"):
        want = f.astype(np.float16)
    bad = mismatches(out, want)
    assert bad.size == 0, [(float(f[i]), hex(_bits(out)[i]), hex(_bits(want)[i])) for i in bad[:5]]


def test_builtins_and_launch_checks(cxx):
    """threadIdx/blockIdx/blockDim/gridDim follow the launch in 3-d; invalid launches are refused."""
    e = build(cxx, _CONVERT_SOURCE)
    grid, block = (3, 2, 2), (4, 3, 2)
    nb, nt = 12, 24
    out = np.full(6 * nb * nt, -1, np.int32)
    e.launch("where_am_i", grid, block, (out,), block_order=np.arange(nb)[::-1])
    got = out.reshape(nb, nt, 6)
    b = np.arange(nb)
    t = np.arange(nt)
    assert (got[:, :, 3] == (b % 3)[:, None]).all() and (got[:, :, 4] == (b // 3 % 2)[:, None]).all()
    assert (got[:, :, 5] == (b // 6)[:, None]).all()
    assert (got[:, :, 0] == t % 4).all() and (got[:, :, 1] == t // 4 % 3).all()
    assert (got[:, :, 2] == t // 12).all()
    x = np.zeros(4, np.float32)
    h = np.zeros(4, np.float16)
    args = (x, h, np.int64(4))
    for grid, block, bo, match in (((1,), (1025,), None, "block dimensions"),
                                   ((1,), (32, 32, 2), None, "block dimensions"),
                                   ((1, 70000), (32,), None, "grid dimensions"),
                                   ((2,), (32,), [0, 0], "not a permutation"),
                                   ((2,), (32,), [0, 2], "not a permutation")):
        with pytest.raises(EmulatedLaunchError, match=match):
            e.launch("to_half", grid, block, args, block_order=bo)
    with pytest.raises(EmulatedLaunchError, match="dimensions must be positive"):
        e.launch("to_half", (0,), (32,), args)


_TINY = r"""
extern "C" __global__ void k(float* p, long long n)
{
    %s
}
"""

UNSUPPORTED = {
    "__syncthreads": _TINY % "p[threadIdx.x] = 1.0f; __syncthreads(); p[0] += p[1];",
    "__shared__": _TINY % "__shared__ float buf[32]; buf[threadIdx.x] = p[0]; p[0] = buf[31];",
    "atomicAdd": _TINY % "atomicAdd(p, 1.0f);",
    "atomicCAS": _TINY % "atomicCAS((int*)p, 0, 1);",
    "__shfl_down_sync": _TINY % "p[0] += __shfl_down_sync(0xffffffffu, p[0], 1);",
    "__shfl_xor_sync": _TINY % "p[0] += __shfl_xor_sync(0xffffffffu, p[0], 16);",
    "__ballot_sync": _TINY % "if (__ballot_sync(0xffffffffu, p[0] > 0)) p[0] = 0;",
    "__syncwarp": _TINY % "__syncwarp(); p[0] = 0;",
    "__threadfence": _TINY % "p[0] = 1; __threadfence();",
    "warpSize": _TINY % "p[0] = warpSize;",
    "__constant__": "__constant__ float c[4];\n" + _TINY % "p[0] = c[0];",
}


@pytest.mark.parametrize("construct", sorted(UNSUPPORTED))
def test_unsupported_constructs_fail_loudly(cxx, construct):
    with pytest.raises(EmulatorCompileError) as info:
        build(cxx, UNSUPPORTED[construct])
    assert "cynag emulator: %s is not supported" % construct in str(info.value)


def test_device_only_macros_are_refused(cxx):
    src = "#ifdef __CUDA_ARCH__\n#define X 1\n#else\n#define X 2\n#endif\n" + _TINY % "p[0] = X;"
    with pytest.raises(EmulatorUnsupported, match="__CUDA_ARCH__"):
        build(cxx, src)
    e = build(cxx, _TINY % "p[0] = 2; // __CUDA_ARCH__ in a comment is fine")
    assert "k" in e.kernels


def test_guards_detect_out_of_bounds_writes(emu, cxx):
    """n = size + 5 writes the five elements after param and v; a write at -1 is seen too."""
    rng = np.random.default_rng(5)
    for dtype, name in cuda_launcher.KERNEL_NAMES.items():
        size = 300
        P, G, V = (Guarded(random_values(rng, dtype, size, (-2, 0), specials=False))
                   for _ in range(3))
        args = cuda_launcher.kernel_args(P.array, G.array, V.array, 0.01, 0.9)
        grid, block = cuda_launcher.launch_config(size, 1, 32)
        emu.launch(name, grid, block, args)
        assert (P.damage(), G.damage(), V.damage()) == ([], [], [])
        args = args[:5] + (np.int64(size + 5),)
        emu.launch(name, grid, block, args)
        # grad's guard is only read (a const pointer), so it may read as anything but stays intact.
        assert P.damage() == list(range(size, size + 5)), dtype
        assert V.damage() == list(range(size, size + 5)), dtype
        assert G.damage() == []
    e = build(cxx, _TINY % "p[(long long)threadIdx.x - 1] = 1.0f;")
    P = Guarded(np.zeros(40, np.float32))
    e.launch("k", (1,), (3,), (P.array, np.int64(40)))
    assert P.damage() == [-1]


# ---------------------------------------------------------------------------
# The kernels: coverage and bit-exact results
# ---------------------------------------------------------------------------
def _counting_problems(emu, dtype, n, sm_count, block):
    """Problems of one counting launch: with lr=1, momentum=0, grad=-1 each update adds 1 to param."""
    grid, blk = cuda_launcher.launch_config(n, sm_count, block)
    problems = []
    want_blocks = max(1, min(-(-n // block), sm_count * cuda_launcher.BLOCKS_PER_SM))
    if grid != (want_blocks,) or blk != (block,):
        problems.append("launch_config(%d, %d, %d) = %s, %s" % (n, sm_count, block, grid, blk))
    P, G, V = Guarded(np.zeros(n, dtype)), Guarded(np.full(n, -1, dtype)), Guarded(np.zeros(n, dtype))
    args = cuda_launcher.kernel_args(P.array, G.array, V.array, 1.0, 0.0)
    emu.launch(cuda_launcher.KERNEL_NAMES[dtype], grid, blk, args)
    counts = P.array.astype(np.float64)
    if not (counts == 1).all():
        bad = np.nonzero(counts != 1)[0]
        problems.append("n=%d sm=%d block=%d: %d elements updated other than once (first: index "
                        "%d, %g times)" % (n, sm_count, block, bad.size, bad[0], counts[bad[0]]))
    if not (V.array == 1).all():
        problems.append("n=%d: v not 1 everywhere" % n)
    for label, A in (("param", P), ("grad", G), ("v", V)):
        if A.damage():
            problems.append("n=%d sm=%d block=%d: %s guard written at %s"
                            % (n, sm_count, block, label, A.damage()[:8]))
    return problems


def _coverage_cases(rng):
    cases = []
    for block in (1, 7, 32, 100, 256, 1024):
        for sm_count in (1, 2, 3, 13, 80, 132):
            cap = sm_count * cuda_launcher.BLOCKS_PER_SM * block
            ns = {0, 1, 2, 3, block - 1, block, block + 1, 2 * block + 1, cap - 1, cap, cap + 1,
                  2 * cap + 3, 3 * cap - 1, int(rng.integers(1, 4 * cap))}
            cases += [(n, sm_count, block) for n in sorted(ns) if 0 <= n <= 3_000_000]
    return cases


def test_launch_config_updates_every_element_exactly_once(emu):
    """For many n, sm_count, block: one update per element (counted), no write outside."""
    rng = np.random.default_rng(7)
    problems = []
    for n, sm_count, block in _coverage_cases(rng):
        problems += _counting_problems(emu, np.dtype(np.float32), n, sm_count, block)
    for dtype in (np.dtype(np.float16), np.dtype(np.float64)):
        for n, sm_count, block in ((0, 1, 32), (1, 1, 32), (257, 1, 32), (4099, 2, 64),
                                   (1000, 80, 256), (2 * 8 * 256 + 1, 1, 256)):
            problems += _counting_problems(emu, dtype, n, sm_count, block)
    assert not problems, problems[:10]


SIZES = (0, 1, 2, 31, 255, 256, 257, 1000, 2049, 4099, 10007, 65537)
#: lr 1e-6 is a float16 subnormal: its rounding to the array dtype matters.
HYPER = ((0.01, 0.9), (0.1, 0.0), (1e-3, 0.99), (0.5, 0.5), (0.0123, 0.95), (1e-6, 0.999))
CONFIGS = ((1, 32), (2, 64), (1, 256), (80, 256), (3, 100))  # (sm_count, block)
STEPS = 4


def _oracle_problems(emu, dtype, seed, sizes=SIZES, hyper=HYPER, steps=STEPS):
    rng = np.random.default_rng(seed)
    name = cuda_launcher.KERNEL_NAMES[dtype]
    rlog = LOG10_RANGES[dtype]
    problems = []
    for si, size in enumerate(sizes):
        shape = random_shape(rng, size)
        for hi, (lr, m) in enumerate(hyper):
            p = random_values(rng, dtype, size, rlog).reshape(shape)
            v = random_values(rng, dtype, size, rlog).reshape(shape) * dtype.type(0.1)
            for step in range(steps):
                sm_count, block = CONFIGS[(si + hi + step) % len(CONFIGS)]
                grid, blk = cuda_launcher.launch_config(size, sm_count, block)
                g = random_values(rng, dtype, size, rlog).reshape(shape)
                args = cuda_launcher.kernel_args(p.ravel(), g.ravel(), v.ravel(), lr, m)
                want_p, want_v = oracle_step(p.ravel(), g.ravel(), v.ravel(), args[3], args[4])
                runs = run_step(emu, name, grid, blk, p.ravel(), g.ravel(), v.ravel(), lr, m,
                                orders(rng, grid, blk))
                where = "%s size=%d shape=%s lr=%r m=%r step=%d grid=%s block=%s" % (
                    dtype, size, shape, lr, m, step, grid, blk)
                label0, p0, v0, _ = runs[0]
                for label, pk, vk, damage in runs:
                    if damage:
                        problems.append("%s order=%s: guards %s" % (where, label, damage))
                    if pk.tobytes() != p0.tobytes() or vk.tobytes() != v0.tobytes():
                        problems.append("%s: order %s differs from %s" % (where, label, label0))
                for what, got, want in (("param", p0, want_p), ("v", v0, want_v)):
                    bad = mismatches(got, want)
                    if bad.size:
                        i = bad[0]
                        problems.append("%s: %s differs from the oracle at %d elements (first %d: "
                                        "%r vs %r)" % (where, what, bad.size, i, got[i], want[i]))
                p, v = p0.reshape(shape), v0.reshape(shape)
    return problems


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_against_oracle_in_every_block_order(emu, dtype):
    """Bit-for-bit equal to the no-FMA oracle, in forward, reversed and random block orders."""
    seed = 11 + np.dtype(dtype).itemsize
    sizes = SIZES + tuple(int(n) for n in np.random.default_rng(seed).integers(3, 20000, size=3))
    problems = _oracle_problems(emu, np.dtype(dtype), seed=seed, sizes=sizes)
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


# ---------------------------------------------------------------------------
# Mutants: the checks above catch broken copies of the kernel
# ---------------------------------------------------------------------------
def _mutant(old, new, path=cuda_launcher.SOURCE_FILE):
    """kernel_source() with ``old`` replaced by ``new`` in the part of the file ``path``."""
    src = cuda_launcher.kernel_source()
    directive = '#line 1 "%s"\n' % path.replace("\\", "/")
    assert src.count(directive) == 1, directive
    start = src.index(directive)
    end = src.find('#line 1 "', start + len(directive))
    end = len(src) if end < 0 else end
    part = src[start:end]
    assert part.count(old) == 1, (
        "the mutation anchor %r is no longer in %s exactly once: update the mutants of "
        "tests/test_cuda_emulation.py to the new source" % (old, os.path.basename(path)))
    return src[:start] + part.replace(old, new) + src[end:]


STRIDE = "const long long stride = (long long)blockDim.x * (long long)gridDim.x;"
MUTANTS = {
    "stride ignores the grid (elements updated several times)":
        (STRIDE, "const long long stride = (long long)blockDim.x;", "coverage"),
    "stride twice the grid (elements skipped)":
        (STRIDE, "const long long stride = 2 * (long long)blockDim.x * (long long)gridDim.x;",
         "coverage"),
    "i <= n (one element past the end)": ("i < n;", "i <= n;", "coverage"),
    "momentum * (momentum * v)":
        ("momentum * momentum * vv", "momentum * (momentum * vv)", "oracle"),
    "(1 + momentum) * (lr * grad)":
        ("(1 + momentum) * lr * g)", "(1 + momentum) * (lr * g))", "oracle"),
    "v not rounded to float16 before the param update":
        ("const C vv = A::load(v_new);",
         "const C vv = v_new_c;",
         "oracle16"),
}


def test_mutants_are_caught(cxx):
    failures = []
    for label, (old, new, check) in MUTANTS.items():
        if check == "oracle16":
            # Keep the unrounded float value next to the stored float16 one.
            src = _mutant("const T v_new = A::store(A::load(v[i]) * momentum - lr * g);",
                          "const C v_new_c = A::load(v[i]) * momentum - lr * g;\n"
                          "    const T v_new = A::store(v_new_c);")
            assert src.count(old) == 1
            src = src.replace(old, new)
        else:
            src = _mutant(old, new)
        e = build(cxx, src)
        if check == "coverage":
            problems = []
            for n, sm_count, block in ((1000, 1, 32), (5000, 2, 64), (777, 3, 100)):
                problems += _counting_problems(e, np.dtype(np.float32), n, sm_count, block)
        elif check == "oracle":
            problems = []
            for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
                problems += _oracle_problems(e, dtype, seed=3, sizes=(4099,),
                                             hyper=((0.0123, 0.95),), steps=1)
        else:
            problems = _oracle_problems(e, np.dtype(np.float16), seed=3, sizes=(4099,),
                                        hyper=((0.0123, 0.95),), steps=1)
        if not problems:
            failures.append(label)
    assert not failures, "mutants the checks did not catch: %s" % failures


# ---------------------------------------------------------------------------
# The multi-tensor kernels: the single-tensor kernel, table by table
# ---------------------------------------------------------------------------
#: Loss scales of the multi-tensor tests: powers of two, values no float16 (or
#: float32) holds exactly, an int, values below 1.
LOSS_SCALES = (128.0, 1000.1, 3, 0.7, 2.0 ** -5, 1e-3, 65504.0, 1.0)


def multi_args(table, n_items, coef):
    """The arguments GPUTable.run passes: ``(table, coef, n_tensors, n_items)``."""
    n_tensors = coef.shape[0]
    return (table, np.ascontiguousarray(coef.reshape(-1)), np.int64(n_tensors),
            np.int64(n_items))


def _random_sizes(rng, n_small, large):
    """Sizes 1 and 2, sizes around the work item size, random small ones, one large one."""
    item = cuda_launcher.MULTI_ITEM_ELEMENTS
    sizes = [1, 1, 2, 3, 255, 257, item - 1, item, item + 1, 2 * item + 3]
    sizes += [int(s) for s in rng.integers(1, 3000, size=n_small)]
    sizes.append(large)
    rng.shuffle(sizes)
    return sizes


def _random_hyper(rng, n, scaled_fraction):
    lrs = [float(rng.choice([0.01, 0.1, 1e-3, 0.5, 0.0123, 1e-6])) if rng.random() < 0.5
           else float(10 ** rng.uniform(-5, -0.5)) for _ in range(n)]
    ms = [float(rng.choice([0.9, 0.0, 0.99, 0.5, 0.95, 0.999])) if rng.random() < 0.5
          else float(rng.uniform(0, 1)) for _ in range(n)]
    scales = [LOSS_SCALES[int(rng.integers(len(LOSS_SCALES)))]
              if rng.random() < scaled_fraction else None for _ in range(n)]
    return lrs, ms, scales


def run_multi(emu, dtype, ps, gs, vs, lrs, ms, scales, sm_count, block, item_elements,
              block_order=None, thread_order=None):
    """One multi-tensor launch on guarded copies; ``(params, grads, vs, problems)``."""
    P = [Guarded(p) for p in ps]
    G = [Guarded(g) for g in gs]
    V = [Guarded(v) for v in vs]
    sizes = [p.size for p in ps]
    ptrs = np.array([[a.array.ctypes.data for a in arrays] for arrays in zip(P, G, V)],
                    np.int64).reshape(-1, 3)
    table, n_items = cuda_launcher.multi_table(sizes, ptrs, item_elements)
    coef, ok = cuda_launcher.multi_coefficients(dtype, lrs, ms, scales)
    assert ok.all(), (lrs, ms, scales)
    grid, blk = cuda_launcher.multi_launch_config(n_items, sm_count, block)
    args = multi_args(table, n_items, coef)
    table_before, coef_before = table.copy(), args[1].copy()
    emu.launch(cuda_launcher.MULTI_KERNEL_NAMES[dtype], grid, blk, args,
               block_order=block_order, thread_order=thread_order)
    problems = []
    for t, arrays in enumerate(zip(P, G, V)):
        for label, A in zip(("param", "grad", "v"), arrays):
            if A.damage():
                problems.append("tensor %d (size %d) %s guard written at %s"
                                % (t, sizes[t], label, A.damage()[:8]))
    if table.tobytes() != table_before.tobytes() or args[1].tobytes() != coef_before.tobytes():
        problems.append("the table or the coefficients were written")
    return ([A.array.copy() for A in P], [A.array.copy() for A in G],
            [A.array.copy() for A in V], problems)


def single_reference(emu, dtype, p, g, v, lr, m, scale):
    """``(param, grad, v)`` after ``grad / scale`` (in the dtype) and the single-tensor kernel."""
    if scale is not None:
        with np.errstate(all="ignore"):
            g = (g / dtype.type(scale)).astype(dtype)  # float16: float32 quotient, RNE: exact
    P, G, V = Guarded(p), Guarded(g), Guarded(v)
    grid, blk = cuda_launcher.launch_config(p.size, 2, 64)
    emu.launch(cuda_launcher.KERNEL_NAMES[dtype], grid, blk,
               cuda_launcher.kernel_args(P.array, G.array, V.array, lr, m))
    assert (P.damage(), G.damage(), V.damage()) == ([], [], [])
    return P.array.copy(), G.array.copy(), V.array.copy()


#: (sm_count, block, item_elements) of the multi-tensor launches.
MULTI_CONFIGS = ((1, 256, cuda_launcher.MULTI_ITEM_ELEMENTS),
                 (2, 32, cuda_launcher.MULTI_ITEM_ELEMENTS),
                 (3, 100, 1000),
                 (80, 256, cuda_launcher.MULTI_ITEM_ELEMENTS),
                 (132, 1024, 4096),
                 (1, 1, 333))


def multi_orders(rng, k, sizes):
    """(label, block order, thread order) of the launches of ``MULTI_CONFIGS[k]`` over
    tensors of ``sizes``: several orders for configurations 0, 2 and 5, else forward."""
    sm_count, block, item = MULTI_CONFIGS[k]
    n_items = -(-sum(sizes) // item)
    grid, blk = cuda_launcher.multi_launch_config(n_items, sm_count, block)
    return orders(rng, grid, blk) if k in (0, 2, 5) else [("forward", None, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_kernel_equals_the_single_kernel_bit_for_bit(emu, dtype):
    """One multi-tensor launch = per tensor ``grad /= scale`` then the single-tensor kernel.

    Random tables (sizes 1, 2, around the work item size, random small ones
    and one large tensor; per-tensor lr and momentum; a loss scale on about
    a third of them), grids of ``multi_launch_config`` for several
    multiprocessor counts, block sizes and work item sizes, blocks and
    threads forward, reversed and in random order: param, v and the divided
    grad are bit-identical to the single-tensor kernel's, the same in every
    order, and nothing outside the arrays (or in the table) is written.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(101 + dtype.itemsize)
    rlog = LOG10_RANGES[dtype]
    sizes = _random_sizes(rng, n_small=30, large=100_003)
    n = len(sizes)
    ps = [random_values(rng, dtype, s, rlog) for s in sizes]
    gs = [random_values(rng, dtype, s, rlog) for s in sizes]
    vs = [random_values(rng, dtype, s, rlog) * dtype.type(0.1) for s in sizes]
    lrs, ms, scales = _random_hyper(rng, n, scaled_fraction=0.35)
    want = [single_reference(emu, dtype, *args) for args in zip(ps, gs, vs, lrs, ms, scales)]
    problems = []
    for k, (sm_count, block, item) in enumerate(MULTI_CONFIGS):
        for label, bo, to in multi_orders(rng, k, sizes):
            where = "%s sm=%d block=%d item=%d order=%s" % (dtype, sm_count, block, item, label)
            got_p, got_g, got_v, damage = run_multi(emu, dtype, ps, gs, vs, lrs, ms, scales,
                                                    sm_count, block, item, bo, to)
            problems += ["%s: %s" % (where, d) for d in damage]
            for t in range(n):
                for what, got, ref in (("param", got_p[t], want[t][0]),
                                       ("grad", got_g[t], want[t][1]),
                                       ("v", got_v[t], want[t][2])):
                    bad = mismatches(got, ref)
                    if bad.size:
                        i = bad[0]
                        problems.append(
                            "%s: tensor %d (size %d, lr %r, m %r, scale %r): %s differs at %d "
                            "elements (first %d: %r vs %r)" % (where, t, sizes[t], lrs[t], ms[t],
                                                               scales[t], what, bad.size, i,
                                                               got[i], ref[i]))
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


def test_multi_kernel_divides_grad_as_numpy_divides_in_the_dtype(emu):
    """With the flag set, grad becomes ``grad / scale`` with the scale rounded to the dtype.

    The quotient is the correctly rounded one of NumPy's same-dtype division
    (float16: computed in float32 and rounded once, which is exact for a
    quotient of float16 values), every float16 value against awkward scales.
    """
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    problems = []
    for scale in (1000.1, 3, 0.7, 1e-3, 65504.0, 2.0 ** -24, 6e-8):
        for dtype, g in ((np.dtype(np.float16), h),
                         (np.dtype(np.float32), np.random.default_rng(3).standard_normal(
                             1 << 14).astype(np.float32) * np.float32(1e30)),
                         (np.dtype(np.float64), np.random.default_rng(4).standard_normal(
                             1 << 14) * 1e300)):
            p = np.zeros(g.size, dtype)
            _, got_g, _, damage = run_multi(emu, dtype, [p], [g], [p.copy()], [0.0], [0.0],
                                            [scale], 2, 256, cuda_launcher.MULTI_ITEM_ELEMENTS)
            with np.errstate(all="ignore"):
                want = g / np.asarray(scale, dtype)
            assert want.dtype == dtype
            bad = mismatches(got_g[0], want)
            if bad.size or damage:
                problems.append("%s / %r: %d mismatches (first: %r -> %r, want %r) %s"
                                % (dtype, scale, bad.size, g[bad[0]] if bad.size else None,
                                   got_g[0][bad[0]] if bad.size else None,
                                   want[bad[0]] if bad.size else None, damage))
    assert not problems, problems


def _multi_counting_problems(emu, dtype, sizes, sm_count, block, item_elements, scaled):
    """One counting launch: lr=1, momentum=0, grad=-1 (or -2 with loss scale 2) adds 1 per update.

    An element updated twice would read 2 (or, with the scale, 1.5: its
    gradient divided twice); one skipped reads 0.
    """
    n = len(sizes)
    g0 = -2.0 if scaled else -1.0
    ps = [np.zeros(s, dtype) for s in sizes]
    gs = [np.full(s, g0, dtype) for s in sizes]
    vs = [np.zeros(s, dtype) for s in sizes]
    got_p, got_g, got_v, problems = run_multi(
        emu, dtype, ps, gs, vs, [1.0] * n, [0.0] * n, [2.0] * n if scaled else None,
        sm_count, block, item_elements)
    where = "%s sizes=%s sm=%d block=%d item=%d scaled=%s" % (
        dtype, sizes if n < 8 else "%d tensors" % n, sm_count, block, item_elements, scaled)
    problems = ["%s: %s" % (where, p) for p in problems]
    for t in range(n):
        for what, a in (("param", got_p[t]), ("v", got_v[t]), ("-grad", -got_g[t])):
            if not (a == 1).all():
                bad = np.nonzero(a != 1)[0]
                problems.append("%s: tensor %d (size %d): %s is not 1 at %d elements (first: "
                                "index %d, %g)" % (where, t, sizes[t], what, bad.size, bad[0],
                                                   a[bad[0]]))
    return problems


def test_multi_launch_config_updates_every_element_exactly_once(emu):
    """Many tables, multiprocessor counts, block and item sizes: one update per element."""
    rng = np.random.default_rng(17)
    item = cuda_launcher.MULTI_ITEM_ELEMENTS
    problems = []
    for sm_count in (1, 2, 3, 13, 80, 132):
        for block in (1, 32, 100, 256, 1024):
            for item_elements in (1, 7, 256, item):
                if item_elements == 1 and block > 32:
                    continue
                sizes = [int(s) for s in rng.integers(1, 3 * item_elements + 2,
                                                      size=int(rng.integers(1, 12)))]
                if item_elements >= 256:
                    sizes.append(int(rng.integers(1, 40_000)))
                problems += _multi_counting_problems(emu, np.dtype(np.float32), sizes, sm_count,
                                                     block, item_elements, scaled=bool(block % 2))
    for dtype in DTYPES:
        for sizes, sm_count, block, item_elements in (([1], 1, 256, item),
                                                      ([item, 1, item + 1], 2, 256, item),
                                                      ([3] * 200, 1, 32, item),
                                                      ([5, 1000, 1, 77], 3, 64, 100),
                                                      ([70_001], 132, 256, item)):
            for scaled in (False, True):
                problems += _multi_counting_problems(emu, dtype, sizes, sm_count, block,
                                                     item_elements, scaled)
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:8])


def test_multi_table_layout():
    """multi_table: ptrs, cum, bounds, first, as the kernel's header comment describes."""
    sizes = [5, 1, 20, 3]
    ptrs = np.arange(12, dtype=np.int64).reshape(4, 3) * 1000
    table, n_items = cuda_launcher.multi_table(sizes, ptrs, item_elements=8)
    assert table.dtype == np.int64 and table.ndim == 1 and table.flags.c_contiguous
    assert n_items == 4  # 29 elements in items of 8
    n = len(sizes)
    assert table[:3 * n].tolist() == ptrs.reshape(-1).tolist()
    cum = table[3 * n:4 * n + 1]
    bounds = table[4 * n + 1:4 * n + 2 + n_items]
    first = table[4 * n + 2 + n_items:]
    assert cum.tolist() == [0, 5, 6, 26, 29]
    assert bounds.tolist() == [0, 8, 16, 24, 29]
    assert first.tolist() == [0, 2, 2, 2]  # item k starts inside tensor first[k]
    assert len(table) == 4 * n + 2 + 2 * n_items
    # A table of one element, and one whose tensors end exactly on item bounds.
    table, n_items = cuda_launcher.multi_table([1], [[1, 2, 3]])
    assert n_items == 1 and table.tolist() == [1, 2, 3, 0, 1, 0, 1, 0]
    table, n_items = cuda_launcher.multi_table([4, 4], [[0, 0, 0], [0, 0, 0]], item_elements=4)
    assert n_items == 2 and table[6 + 3:6 + 3 + 3].tolist() == [0, 4, 8]
    assert table[-2:].tolist() == [0, 1]
    for n_items, sm_count in ((1, 1), (7, 1), (9, 1), (10 ** 6, 132), (0, 3)):
        grid, block = cuda_launcher.multi_launch_config(n_items, sm_count)
        assert grid == (max(1, min(n_items, sm_count * cuda_launcher.BLOCKS_PER_SM)),)
        assert block == (cuda_launcher.BLOCK_SIZE,)


MULTI_MUTANTS = {
    "blocks take every item (item += 1)":
        ("item += gridDim.x", "item += 1", "coverage"),
    "a tensor restarts at its first element in every item":
        ("const long long start = b0 > base ? b0 - base : 0;", "const long long start = 0;",
         "coverage"),
    "threads stride by twice the block":
        ("i < stop; i += blockDim.x", "i < stop; i += 2 * blockDim.x", "coverage"),
    "grad multiplied by the reciprocal of the scale":
        ("A::load(grad[i]) / loss_scale", "A::load(grad[i]) * (1 / loss_scale)", "oracle"),
    "one tensor's coefficients for all":
        ("const C lr = coef[4 * t];", "const C lr = coef[0];", "oracle"),
}


def test_multi_mutants_are_caught(cxx):
    """Broken copies of the multi-tensor kernel fail the counting or the comparison."""
    failures = []
    rng = np.random.default_rng(5)
    dtype = np.dtype(np.float32)
    sizes = _random_sizes(rng, n_small=6, large=20_001)
    ps = [random_values(rng, dtype, s, (-3, 2)) for s in sizes]
    gs = [random_values(rng, dtype, s, (-3, 2)) for s in sizes]
    vs = [random_values(rng, dtype, s, (-3, 2)) for s in sizes]
    lrs, ms, scales = _random_hyper(rng, len(sizes), scaled_fraction=0.5)
    for label, (old, new, check) in MULTI_MUTANTS.items():
        e = build(cxx, _mutant(old, new))
        if check == "coverage":
            problems = []
            for sm_count, block, item in ((1, 32, 100), (2, 64, 1000), (3, 100, 8192)):
                problems += _multi_counting_problems(e, dtype, [1000, 1, 5000, 77], sm_count,
                                                     block, item, scaled=True)
        else:
            want = [single_reference(e, dtype, *a) for a in zip(ps, gs, vs, lrs, ms, scales)]
            got_p, got_g, got_v, problems = run_multi(e, dtype, ps, gs, vs, lrs, ms, scales, 2,
                                                      64, cuda_launcher.MULTI_ITEM_ELEMENTS)
            for t in range(len(sizes)):
                for got, ref in zip((got_p[t], got_g[t], got_v[t]), want[t]):
                    if mismatches(got, ref).size:
                        problems.append(t)
        if not problems:
            failures.append(label)
    assert not failures, "mutants the checks did not catch: %s" % failures


# ---------------------------------------------------------------------------
# The kernels of the optimizer hooks (hooks.cu): operation programs
# ---------------------------------------------------------------------------
def _check_hook_signatures(kernels):
    """Hook kernels ``(T* g, const T* p, long long n, const double* ops, long long n_ops)``;
    sums of squares ``(const T* x, long long n, double* partial)`` and ``(const long long*
    table, double* partial, long long n_tensors, long long n_items)``."""
    f64 = np.dtype(np.float64)
    for dtype, name in cuda_launcher.HOOK_KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["g", "p", "n", "ops", "n_ops"], name
        g, p, n, ops, n_ops = params
        assert g.pointer and not g.const and POINTEE_DTYPES[g.base] == dtype, (name, g)
        assert p.pointer and p.const and POINTEE_DTYPES[p.base] == dtype, (name, p)
        assert ops.pointer and ops.const and POINTEE_DTYPES[ops.base] == f64, (name, ops)
        for c in (n, n_ops):
            assert not c.pointer and c.base == "long long", (name, c)
    for dtype, name in cuda_launcher.SUM_SQUARES_KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["x", "n", "partial"], name
        x, n, partial = params
        assert x.pointer and x.const and POINTEE_DTYPES[x.base] == dtype, (name, x)
        assert not n.pointer and n.base == "long long", (name, n)
        assert partial.pointer and not partial.const and POINTEE_DTYPES[partial.base] == f64
    for dtype, name in cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES.items():
        params = kernels[name]
        assert [p.name for p in params] == ["table", "partial", "n_tensors", "n_items"], name
        table, partial = params[:2]
        assert table.pointer and table.const and table.base == "long long", (name, table)
        assert partial.pointer and not partial.const and POINTEE_DTYPES[partial.base] == f64
        for c in params[2:]:
            assert not c.pointer and c.base == "long long", (name, c)


def native_ops(dtype, ops):
    """The operations of ``ops`` that the CPU also runs natively (NumPy 1.x keeps
    them in the array dtype; see :func:`cynag_kernels.hooks.op_row`)."""
    return [op for op in ops if op[0] == "add" or cpu_hooks.op_row(dtype, op) is not None]


def hook_rows(dtype, ops):
    """The rows of ``ops`` for arrays of ``dtype`` (:func:`cynag_kernels.hooks.op_row`)."""
    rows = [cpu_hooks.op_row(dtype, op) for op in ops]
    assert all(r is not None for r in rows), ops  # all done natively on the CPU too
    return np.array(rows, np.float64).reshape(-1, 4)


def hook_reference(g, p, ops):
    """``g`` after :func:`cynag_kernels.hooks.apply_ops` (on a copy)."""
    want = g.copy()
    cpu_hooks.apply_ops(want, p, ops)
    return want


def run_hook(emu, dtype, g, p, rows, sm_count, block, block_order=None, thread_order=None):
    """One hook kernel launch on guarded copies (``p`` None: ``g`` is passed for it).

    Returns ``(g after, problems)``: guards written, ``p`` or the rows changed.
    """
    rows = np.ascontiguousarray(rows, np.float64).reshape(-1, 4)
    G = Guarded(g)
    P = None if p is None else Guarded(p)
    O = Guarded(rows)
    grid, blk = cuda_launcher.launch_config(G.n, sm_count, block)
    args = (G.array, (G if P is None else P).array, np.int64(G.n), O.array,
            np.int64(len(rows)))
    emu.launch(cuda_launcher.HOOK_KERNEL_NAMES[dtype], grid, blk, args,
               block_order=block_order, thread_order=thread_order)
    problems = []
    for label, A in (("g", G), ("p", P), ("ops", O)):
        if A is not None and A.damage():
            problems.append("%s guard written at %s" % (label, A.damage()[:8]))
    if P is not None and _bits(P.array).tobytes() != _bits(np.asarray(p).reshape(-1)).tobytes():
        problems.append("p (const) was written")
    if O.array.tobytes() != rows.reshape(-1).tobytes():
        problems.append("the rows were written")
    return G.array.copy(), problems


def _hook_coefficients(dtype):
    """Ordinary coefficients, then special ones (zeros, extremes, inf, NaN)."""
    fi = np.finfo(dtype)
    ordinary = [5e-4, 1e-4, 0.3, -0.3, 1.0, 2.5, -7.0, 0.1, 0.999]
    special = [0.0, -0.0, float(fi.max), -float(fi.max), float(fi.smallest_subnormal),
               float(fi.tiny), 1e-30, math.inf, -math.inf, math.nan]
    return ordinary, special


#: Clip bounds: one or both, infinite, crossed, NaN, signed zeros, beyond float16's range.
CLIP_BOUNDS = ((-1.0, 1.0), (None, 0.5), (-0.25, None), (None, None), (-math.inf, math.inf),
               (1.0, -1.0), (math.nan, 1.0), (-1.0, math.nan), (0.0, -0.0), (-0.0, 0.0),
               (-1e6, 1e6), (1e-8, 1e-3), (-1e300, 1e300), (-math.inf, -1.0))

#: Kinds of the programs that read the parameter, and of those that read the noise.
PARAM_KINDS = ("weight_decay", "lasso", "clip", "scale")
NOISE_KINDS = ("add", "clip", "scale")


def random_program(rng, dtype, p, source, length=None):
    """1 to 5 operations reading the parameter ``p`` (``source="param"``) or the noise ``p``."""
    kinds = PARAM_KINDS if source == "param" else NOISE_KINDS
    ordinary, special = _hook_coefficients(dtype)
    ops = []
    for _ in range(int(rng.integers(1, 6)) if length is None else length):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "clip":
            bounds = CLIP_BOUNDS[int(rng.integers(len(CLIP_BOUNDS)))]
            while any(b != b for b in bounds if b is not None) and rng.random() < 0.8:
                bounds = CLIP_BOUNDS[int(rng.integers(len(CLIP_BOUNDS)))]  # NaN bounds: rarer
            ops.append(("clip",) + bounds)
        elif kind == "add":
            ops.append(("add", p))
        else:
            pool = special if rng.random() < 0.1 else ordinary
            ops.append((kind, pool[int(rng.integers(len(pool)))]))
    return native_ops(dtype, ops) or [("scale", 0.5)]


def _single_programs(dtype, param, noise):
    """Every kind alone with several coefficients or bounds: ``[(ops, p)]``."""
    ordinary, special = _hook_coefficients(dtype)
    out = []
    for kind in ("weight_decay", "lasso", "scale"):
        for a in ordinary[:3] + special:
            out.append(([(kind, a)], param))
    out += [([("clip",) + b], None) for b in CLIP_BOUNDS]
    out.append(([("add", noise)], noise))
    return [(ops, p) for ops, p in out if native_ops(dtype, ops) == ops]


def _hook_problems(emu, dtype, g, p, ops, sm_count, block, order_list):
    rows = hook_rows(dtype, ops)
    want = hook_reference(g, p, ops)
    problems = []
    first = None
    for label, bo, to in order_list:
        got, probs = run_hook(emu, dtype, g, p, rows, sm_count, block, bo, to)
        where = "%s n=%d sm=%d block=%d order=%s ops=%s" % (
            dtype, g.size, sm_count, block, label,
            [(o[0],) + tuple(x if not isinstance(x, np.ndarray) else "noise" for x in o[1:])
             for o in ops])
        problems += ["%s: %s" % (where, q) for q in probs]
        if first is None:
            first = got
        elif _bits(got).tobytes() != _bits(first).tobytes():
            problems.append("%s: differs from the first order" % where)
        bad = mismatches(got, want)
        if bad.size:
            i = bad[0]
            problems.append("%s: differs from apply_ops at %d elements (first %d: g=%r p=%r -> "
                            "%r, want %r)" % (where, bad.size, i, g[i],
                                              None if p is None else p[i], got[i], want[i]))
    return problems


HOOK_SIZES = (1, 2, 31, 256, 257, 1000, 4099, 65537)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hook_ops_bit_identical_to_apply_ops(emu, dtype):
    """Every kind alone and random programs of up to 5 operations: apply_ops's bits.

    Gradients, parameters and noise with zeros of both signs, infinities,
    NaNs, subnormals and the largest values; coefficients including zeros,
    extremes, infinities and NaN; clip bounds one- and two-sided, infinite,
    crossed, NaN, beyond the dtype's range.  Grids of ``launch_config`` for
    several multiprocessor counts and block sizes, blocks and threads
    forward, reversed and in random order; nothing outside the arrays is
    written, ``p`` and the rows are left alone.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(201 + dtype.itemsize)
    rlog = LOG10_RANGES[dtype]
    problems = []
    k = 0
    for size in HOOK_SIZES:
        g = random_values(rng, dtype, size, rlog)
        param = random_values(rng, dtype, size, rlog)
        noise = random_values(rng, dtype, size, rlog)
        programs = [(random_program(rng, dtype, param, "param"), param) for _ in range(3)]
        programs += [(random_program(rng, dtype, noise, "noise"), noise) for _ in range(2)]
        if size in (257, 4099):
            programs += _single_programs(dtype, param, noise)
        for ops, p in programs:
            sm_count, block = CONFIGS[k % len(CONFIGS)]
            k += 1
            grid, blk = cuda_launcher.launch_config(size, sm_count, block)
            order_list = orders(rng, grid, blk) if k % 4 == 0 else [("forward", None, None)]
            problems += _hook_problems(emu, dtype, g, p, ops, sm_count, block, order_list)
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


def test_hook_ops_every_float16_value(emu):
    """float16: every bit pattern of g (p a permutation of them), every kind, programs of 4."""
    dtype = np.dtype(np.float16)
    rng = np.random.default_rng(5)
    g = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    param = rng.permutation(g)
    noise = rng.permutation(g)
    programs = _single_programs(dtype, param, noise)
    programs += [(random_program(rng, dtype, param, "param", length=4), param) for _ in range(3)]
    programs += [(random_program(rng, dtype, noise, "noise", length=4), noise) for _ in range(2)]
    problems = []
    for ops, p in programs:
        problems += _hook_problems(emu, dtype, g, p, ops, 13, 256, [("forward", None, None)])
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


def test_hook_ops_cover_every_element_once(emu):
    """g = 0 plus noise 1 (one ``add``): every element 1 after one launch, nothing outside."""
    rng = np.random.default_rng(9)
    rows = np.array([[cuda_launcher.HOOK_OP_CODES["add"], 0, 0, 0]], np.float64)
    problems = []
    cases = [(n, sm, b) for n, sm, b in _coverage_cases(rng) if b in (32, 256, 1024) and n]
    for n, sm_count, block in cases[::3]:
        got, probs = run_hook(emu, np.dtype(np.float32), np.zeros(n, np.float32),
                              np.ones(n, np.float32), rows, sm_count, block)
        problems += ["n=%d sm=%d block=%d: %s" % (n, sm_count, block, q) for q in probs]
        if not (got == 1).all():
            problems.append("n=%d sm=%d block=%d: %d elements not added once"
                            % (n, sm_count, block, int((got != 1).sum())))
    assert not problems, problems[:5]


def test_hook_ops_empty_program_unknown_kind_and_empty_array(emu):
    """No row, or a row of an unknown kind: g unchanged; n = 0: nothing written."""
    rng = np.random.default_rng(4)
    for dtype in DTYPES:
        g = random_values(rng, dtype, 300, LOG10_RANGES[dtype])
        for rows in (np.zeros((0, 4)), np.array([[9.0, 2.0, 3.0, 3.0]]),
                     np.array([[0.0, 2.0, 3.0, 3.0]])):
            got, problems = run_hook(emu, dtype, g, g, rows, 1, 64)
            assert not problems and mismatches(got, g).size == 0, (dtype, rows)
        G = Guarded(np.zeros(0, dtype))
        emu.launch(cuda_launcher.HOOK_KERNEL_NAMES[dtype], (1,), (32,),
                   (G.array, G.array, np.int64(0), np.zeros(4), np.int64(1)))
        assert G.damage() == []


# ---------------------------------------------------------------------------
# The kernels of the optimizer hooks: partial sums of squares
# ---------------------------------------------------------------------------
def exact_sum_squares(arrays):
    """The sum of the squares in float64, correctly rounded (math.fsum of float64 squares)."""
    return math.fsum(float(v) for a in arrays for v in
                     np.square(np.asarray(a, np.float64).reshape(-1)))


def _relative_problem(got, want, tol=1e-12):
    if math.isnan(want):
        return None if math.isnan(got) else "got %r, want NaN" % got
    if math.isinf(want) or want == 0:
        return None if got == want else "got %r, want %r" % (got, want)
    err = abs(got - want) / abs(want)
    return None if err <= tol else "got %r, want %r (relative error %.3g)" % (got, want, err)


def run_sum_squares(emu, dtype, x, grid, block, block_order=None, thread_order=None):
    """One single-array launch; ``(partial, problems)`` (every entry written, guards intact)."""
    X = Guarded(x)
    threads = int(np.prod(grid)) * int(np.prod(block))
    partial = Guarded(np.full(threads, np.nan))  # a plain NaN: an entry left unwritten
    emu.launch(cuda_launcher.SUM_SQUARES_KERNEL_NAMES[dtype], grid, block,
               (X.array, np.int64(X.n), partial.array), block_order=block_order,
               thread_order=thread_order)
    problems = []
    for label, A in (("x", X), ("partial", partial)):
        if A.damage():
            problems.append("%s guard written at %s" % (label, A.damage()[:8]))
    return partial.array.copy(), problems


def run_sum_squares_multi(emu, dtype, xs, sm_count, block, item_elements, block_order=None,
                          thread_order=None):
    """One table launch; ``(partial, problems)``."""
    X = [Guarded(x) for x in xs]
    table, n_items = cuda_launcher.sum_squares_table([x.size for x in xs],
                                                     [A.array.ctypes.data for A in X],
                                                     item_elements)
    grid, blk = cuda_launcher.multi_launch_config(n_items, sm_count, block)
    partial = Guarded(np.full(grid[0] * blk[0], np.nan))
    before = table.copy()
    emu.launch(cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES[dtype], grid, blk,
               (table, partial.array, np.int64(len(xs)), np.int64(n_items)),
               block_order=block_order, thread_order=thread_order)
    problems = ["array %d guard written at %s" % (t, A.damage()[:8])
                for t, A in enumerate(X) if A.damage()]
    if partial.damage():
        problems.append("partial guard written at %s" % partial.damage()[:8])
    if table.tobytes() != before.tobytes():
        problems.append("the table was written")
    return partial.array.copy(), problems


SUM_SIZES = (0, 1, 2, 31, 257, 1000, 4099, 65537, 200003)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_squares_partial_against_numpy(emu, dtype):
    """Single array: every partial written, their sum the float64 sum of squares to 1e-12.

    Random values over the dtype's range; sizes that wrap the grid-stride
    loop; several grids, block orders; ones count every element exactly once.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(301 + dtype.itemsize)
    problems = []
    for si, size in enumerate(SUM_SIZES):
        x = random_values(rng, dtype, size, LOG10_RANGES[dtype], specials=False)
        want = exact_sum_squares([x])
        for ci, (sm_count, block) in enumerate(CONFIGS):
            grid, blk = cuda_launcher.launch_config(size, sm_count, block)
            order_list = orders(rng, grid, blk) if (si + ci) % 5 == 0 else \
                [("forward", None, None)]
            for label, bo, to in order_list:
                where = "%s n=%d sm=%d block=%d order=%s" % (dtype, size, sm_count, block, label)
                partial, probs = run_sum_squares(emu, dtype, x, grid, blk, bo, to)
                problems += ["%s: %s" % (where, q) for q in probs]
                if np.isnan(partial).any():
                    problems.append("%s: %d partial sums not written"
                                    % (where, int(np.isnan(partial).sum())))
                q = _relative_problem(float(np.sum(partial)), want)
                if q:
                    problems.append("%s: %s" % (where, q))
            partial, _ = run_sum_squares(emu, dtype, np.ones(size, dtype), grid, blk)
            if float(np.sum(partial)) != size:
                problems.append("%s n=%d sm=%d block=%d: ones sum to %r"
                                % (dtype, size, sm_count, block, float(np.sum(partial))))
    for values, want in (([1.0, np.inf, 2.0], np.inf), ([1.0, -np.inf], np.inf),
                         ([np.nan, 1.0], np.nan), ([np.inf, np.nan], np.nan),
                         ([-0.0, 0.0], 0.0)):
        x = np.array(values * 20, dtype)
        partial, _ = run_sum_squares(emu, dtype, x, (2,), (32,))
        q = _relative_problem(float(np.sum(partial)), want)
        if q:
            problems.append("%s %s: %s" % (dtype, values, q))
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_squares_multi_partial_against_numpy(emu, dtype):
    """Tables of arrays (sizes 1, around the work item, one large): the total to 1e-12.

    Several multiprocessor counts, block and work item sizes, block orders;
    with ones the total is the element count exactly.
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(401 + dtype.itemsize)
    sizes = _random_sizes(rng, n_small=20, large=70_001)
    xs = [random_values(rng, dtype, s, LOG10_RANGES[dtype], specials=False) for s in sizes]
    ones = [np.ones(s, dtype) for s in sizes]
    want = exact_sum_squares(xs)
    problems = []
    for k, (sm_count, block, item) in enumerate(MULTI_CONFIGS):
        for label, bo, to in multi_orders(rng, k, sizes):
            where = "%s sm=%d block=%d item=%d order=%s" % (dtype, sm_count, block, item, label)
            partial, probs = run_sum_squares_multi(emu, dtype, xs, sm_count, block, item, bo, to)
            problems += ["%s: %s" % (where, q) for q in probs]
            if np.isnan(partial).any():
                problems.append("%s: partial sums not written" % where)
            q = _relative_problem(float(np.sum(partial)), want)
            if q:
                problems.append("%s: %s" % (where, q))
        partial, _ = run_sum_squares_multi(emu, dtype, ones, sm_count, block, item)
        if float(np.sum(partial)) != sum(sizes):
            problems.append("%s sm=%d block=%d item=%d: ones sum to %r, not %d"
                            % (dtype, sm_count, block, item, float(np.sum(partial)), sum(sizes)))
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])


HOOK_MUTANTS = {
    "sign(+-0) = 1":
        ("x < C(0) ? C(-1) : (x == x ? C(0) : x)", "x < C(0) ? C(-1) : C(1)", "hook"),
    "clip's max does not keep a NaN gradient":
        ("return x != x ? x : (x > y ? x : y);", "return x > y ? x : y;", "hook"),
    "float16 product not rounded before the sum":
        ("x = E::round(x + E::round(a * pv));", "x = E::round(x + a * pv);", "hook16"),
    "the noise is not read for add":
        ("return kind == kWeightDecay || kind == kLasso || kind == kAdd;",
         "return kind == kWeightDecay || kind == kLasso;", "hook"),
    "sum of squares reads one element past the end":
        ("for (long long i = start; i < n; i += stride) {",
         "for (long long i = start; i <= n; i += stride) {", "sum"),
    "blocks of the table kernel write the same partial sums":
        ("partial[(long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x] = acc;",
         "partial[(long long)threadIdx.x] = acc;", "sum_multi"),
}


def test_hook_mutants_are_caught(cxx):
    """Broken copies of the hook and sum-of-squares kernels fail the comparisons above."""
    failures = []
    rng = np.random.default_rng(12)
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    for label, (old, new, check) in HOOK_MUTANTS.items():
        e = build(cxx, _mutant(old, new, cuda_launcher.HOOKS_SOURCE_FILE))
        problems = []
        if check in ("hook", "hook16"):
            dtype = f16 if check == "hook16" else f32
            g = random_values(rng, dtype, 4099, LOG10_RANGES[dtype])
            param = random_values(rng, dtype, 4099, LOG10_RANGES[dtype])
            noise = random_values(rng, dtype, 4099, LOG10_RANGES[dtype])
            for ops, p in _single_programs(dtype, param, noise):
                problems += _hook_problems(e, dtype, g, p, ops, 2, 64, [("forward", None, None)])
        elif check == "sum":
            x = random_values(rng, f32, 1000, (-2, 2), specials=False)
            partial, problems = run_sum_squares(e, f32, x, (3,), (64,))
            q = _relative_problem(float(np.sum(partial)), exact_sum_squares([x]))
            problems += [q] if q else []
        else:
            xs = [np.ones(s, f32) for s in (5000, 1, 9000, 77)]
            partial, problems = run_sum_squares_multi(e, f32, xs, 2, 64, 1000)
            if float(np.sum(partial)) != 14078:
                problems.append("ones sum to %r" % float(np.sum(partial)))
        if not problems:
            failures.append(label)
    assert not failures, "mutants the checks did not catch: %s" % failures


# ---------------------------------------------------------------------------
# The launcher and the optimizer on an emulated CuPy
# ---------------------------------------------------------------------------
class FakeCupyArray:
    """A ``cupy.ndarray`` stand-in: a NumPy array (host memory) said to be on a device.

    ``data.ptr`` is the host address of the first element, so the emulated
    kernels read and write the NumPy memory through the launcher's pointers
    and tables.  What cynag uses of a CuPy array is provided with CuPy's
    semantics; an implicit conversion to NumPy raises, as CuPy's does.
    """

    def __init__(self, fake, host, device_id):
        self._fake = fake
        self._host = host
        self._device_id = device_id
        fake.register(host, device_id)

    # -- attributes --------------------------------------------------------
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    size = property(lambda self: self._host.size)
    ndim = property(lambda self: self._host.ndim)
    strides = property(lambda self: self._host.strides)
    itemsize = property(lambda self: self._host.itemsize)
    nbytes = property(lambda self: self._host.nbytes)
    flags = property(lambda self: self._host.flags)
    device = property(lambda self: self._fake.module.cuda.Device(self._device_id))

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._host.ctypes.data, device_id=self._device_id)

    def _wrap(self, host, device_id=None):
        return FakeCupyArray(self._fake, host, self._device_id if device_id is None else device_id)

    # -- views and copies --------------------------------------------------
    def ravel(self, order="C"):
        return self._wrap(self._host.ravel(order))

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self._wrap(self._host.reshape(shape, order=order))

    def copy(self, order="C"):
        return self._wrap(self._host.copy(order=order), self._fake.current())

    def astype(self, dtype, copy=True):
        return self._wrap(self._host.astype(dtype), self._fake.current())

    def get(self):
        return self._host.copy()

    def __getitem__(self, key):
        r = self._host[key]
        if not isinstance(r, np.ndarray):  # CuPy returns 0-d arrays, not scalars
            r = self._host[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        return self._wrap(r)

    def __setitem__(self, key, value):
        if isinstance(value, FakeCupyArray):
            value = value._host
        self._host[key] = value

    def fill(self, value):
        self._host.fill(value)

    # -- arithmetic: what the per-parameter path uses ----------------------
    def __itruediv__(self, other):
        # CuPy: a Python scalar takes the array's dtype, then same-dtype division
        # (a 0-d array is an array, not a scalar, for CuPy's type rules).
        if not isinstance(other, (int, float, np.floating, np.integer)):
            return NotImplemented
        with np.errstate(all="ignore"):
            np.divide(self._host, np.asarray(other, self.dtype), out=self._host)
        return self

    def __float__(self):
        return float(self._host.reshape(()))

    def __len__(self):
        return len(self._host)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (fake CuPy)")

    def __repr__(self):
        return "fake_cupy.ndarray(%r, device=%d)" % (self._host, self._device_id)


FakeCupyArray.__module__ = "cupy._core.core"
FakeCupyArray.__name__ = FakeCupyArray.__qualname__ = "ndarray"


class FakeCupy:
    """A ``cupy`` module that runs RawModule kernels in the emulator and counts launches.

    ``module`` is the module object installed as ``sys.modules['cupy']``.
    Every launch is recorded in :attr:`launches` as ``(name, device)``; a
    launch whose array arguments, or whose table's pointers, are not memory
    of the current device raises (on a GPU that is an illegal address).
    Blocks run in a random order.
    """

    def __init__(self, emu, sm_counts=(3, 2), seed=0):
        self.emu = emu
        self.sm_counts = tuple(sm_counts)
        self.rng = np.random.default_rng(seed)
        self.launches = []
        self.modules_built = []
        self.uploads = 0        # host-to-device copies (cupy.asarray of host data)
        self.reductions = []    # (dtype, size, device) of each cupy.sum
        self._stack = [0]
        self._allocs = {}       # id of the base buffer -> (start, end, device, base)
        fake = self

        class CUDARuntimeError(RuntimeError):
            pass

        class Device:
            def __init__(self, device=None):
                self.id = fake.current() if device is None else int(device)
                if not 0 <= self.id < len(fake.sm_counts):
                    raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

            @property
            def attributes(self):
                return {"MultiProcessorCount": fake.sm_counts[self.id]}

            def __enter__(self):
                fake._stack.append(self.id)
                return self

            def __exit__(self, *exc):
                fake._stack.pop()

            def use(self):
                fake._stack[0] = self.id

            def synchronize(self):
                pass

            def __eq__(self, other):
                return isinstance(other, Device) and other.id == self.id

            def __hash__(self):
                return hash(self.id)

        class RawModule:
            def __init__(self, code=None, options=(), **kwargs):
                self.device = fake.current()
                fake.modules_built.append((self.device, code, tuple(options)))

            def get_function(self, name):
                if name not in fake.emu.kernels:
                    raise AttributeError("no kernel %r in the module" % name)
                return _Function(self, name)

        class _Function:
            def __init__(self, module, name):
                self.module, self.name = module, name

            def __call__(self, grid, block, args, **kwargs):
                fake.launch(self, grid, block, args)

        m = types.ModuleType("cupy")
        m.__version__ = "0.0-fake"
        m.ndarray = FakeCupyArray
        m.RawModule = RawModule
        m.asarray = self.asarray
        m.array = self.asarray
        m.zeros_like = lambda a, dtype=None: self.new(np.zeros_like(a._host, dtype=dtype))
        m.empty_like = lambda a, dtype=None: self.new(np.empty_like(a._host, dtype=dtype))
        m.full_like = lambda a, v, dtype=None: self.new(np.full_like(a._host, v, dtype=dtype))
        m.zeros = lambda shape, dtype=float, order="C": self.new(np.zeros(shape, dtype, order))
        m.empty = lambda shape, dtype=float, order="C": self.new(np.empty(shape, dtype, order))
        m.ascontiguousarray = lambda a: (a if a.flags.c_contiguous else
                                         self.new(np.ascontiguousarray(a._host)))
        m.asnumpy = lambda a: a.get() if isinstance(a, FakeCupyArray) else np.asarray(a)
        m.sum = self.sum
        m.cuda = types.SimpleNamespace(
            Device=Device,
            runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError,
                                          getDeviceCount=lambda: len(fake.sm_counts)))
        self.module = m

    # -- devices and memory ------------------------------------------------
    def current(self):
        return self._stack[-1]

    def new(self, host, device_id=None):
        """A new fake CuPy array holding ``host`` on ``device_id`` (default: current)."""
        return FakeCupyArray(self, host, self.current() if device_id is None else device_id)

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeCupyArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        self.uploads += 1
        return self.new(np.array(a, dtype=dtype, copy=True))

    def sum(self, a, dtype=None):
        """``cupy.sum`` of a whole array: a 0-d array on the current device (NumPy's sum)."""
        if not isinstance(a, FakeCupyArray):
            raise TypeError("fake cupy.sum: a CuPy array is needed")
        if a._device_id != self.current():
            raise AssertionError("cupy.sum of an array on device %d on device %d"
                                 % (a._device_id, self.current()))
        self.reductions.append((a.dtype, a.size, self.current()))
        return self.new(np.asarray(np.sum(a._host, dtype=dtype)))

    def register(self, host, device_id):
        base = host
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = id(base)
        known = self._allocs.get(key)
        if known is not None and known[3] is base:
            if known[2] != device_id:
                raise AssertionError("fake CuPy: one buffer said to be on devices %d and %d"
                                     % (known[2], device_id))
            return
        start = base.ctypes.data
        self._allocs[key] = (start, start + base.nbytes, device_id, base)

    def device_of_range(self, ptr, nbytes):
        for start, end, dev, _ in self._allocs.values():
            if start <= ptr and ptr + nbytes <= end:
                return dev
        return None

    # -- launches ----------------------------------------------------------
    def launch(self, function, grid, block, args):
        dev = self.current()
        name = function.name
        if function.module.device != dev:
            raise AssertionError("%s: module loaded on device %d launched on device %d"
                                 % (name, function.module.device, dev))
        host_args = []
        for i, a in enumerate(args):
            if isinstance(a, FakeCupyArray):
                if a._device_id != dev:
                    raise AssertionError("%s argument %d is on device %d, launch on device %d"
                                         % (name, i, a._device_id, dev))
                a = a._host
            elif isinstance(a, np.ndarray):
                raise AssertionError("%s argument %d is a NumPy array (host memory)" % (name, i))
            host_args.append(a)
        if name in self.emu.kernels and self.emu.kernels[name][0].name == "table":
            self._check_table(name, dev, host_args)
        self.launches.append((name, dev))
        nblocks = int(np.prod(grid))
        self.emu.launch(name, grid, block, tuple(host_args),
                        block_order=self.rng.permutation(nblocks))

    def _check_table(self, name, dev, args):
        """The table's pointers: NesterovAG (3 per tensor) or sum of squares (1 per array)."""
        table, second, n_tensors, n_items = args[:4]
        n = int(n_tensors)
        if name in cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES.values():
            per = 1
            assert table.size == 2 * n + 2 + 2 * int(n_items), name
        else:
            per = 3
            assert table.size == 4 * n + 2 + 2 * int(n_items) and second.size == 4 * n, name
        cum = table[per * n:per * n + n + 1]
        itemsize = np.dtype(self._dtype_of(name)).itemsize
        for t in range(n):
            nbytes = int(cum[t + 1] - cum[t]) * itemsize
            for k in range(per):
                ptr = int(table[per * t + k])
                where = self.device_of_range(ptr, nbytes)
                if where != dev:
                    raise AssertionError("%s: tensor %d array %d (%d bytes at %#x) is %s, the "
                                         "launch is on device %d"
                                         % (name, t, k, nbytes, ptr,
                                            "not device memory" if where is None
                                            else "on device %d" % where, dev))

    @staticmethod
    def _dtype_of(name):
        for names in ALL_NAME_TABLES:
            for dtype, n in names.items():
                if n == name:
                    return dtype
        raise KeyError(name)


@pytest.fixture
def fake_cupy(monkeypatch, emu):
    """An emulated CuPy with two devices (3 and 2 multiprocessors), for this test only.

    Installed as ``sys.modules['cupy']``; the launcher's module and
    multiprocessor caches are emptied for the test and restored after it.
    """
    fake = FakeCupy(emu)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(cuda_launcher, "_modules", {})
    monkeypatch.setattr(cuda_launcher, "_sm_counts", {})
    monkeypatch.setattr(cuda_launcher, "_rows_cache", type(cuda_launcher._rows_cache)())
    yield fake


def test_fake_cupy_runs_the_per_parameter_launcher(fake_cupy):
    """nesterov_ag_gpu on fake arrays: one launch on the arrays' device, result of the kernel."""
    rng = np.random.default_rng(8)
    for dev in (0, 1):
        for dtype in DTYPES:
            for layout in ("C", "F", "strided"):
                host = [random_values(rng, dtype, 12 * 35, (-2, 1), specials=False)
                        .reshape(12, 35, order="C" if layout != "F" else "F") for _ in range(3)]
                if layout == "F":
                    host = [np.asfortranarray(h) for h in host]
                if layout == "strided":
                    arrays = [fake_cupy.new(np.repeat(h, 2, axis=1), dev)[:, ::2] for h in host]
                else:
                    arrays = [fake_cupy.new(h.copy(order="K"), dev) for h in host]
                want = single_reference(fake_cupy.emu, dtype, *(h.ravel() for h in host),
                                        0.01, 0.9, None)
                del fake_cupy.launches[:]
                cuda_launcher.nesterov_ag_gpu(arrays[0], arrays[1], arrays[2], 0.01, 0.9)
                assert fake_cupy.launches == [(cuda_launcher.KERNEL_NAMES[dtype], dev)]
                for a, w in ((arrays[0], want[0]), (arrays[2], want[2])):
                    got = a.get().ravel()  # C order, as want
                    assert mismatches(got, w).size == 0, (dev, dtype, layout)
    built = fake_cupy.modules_built
    assert [d for d, _, _ in built] == [0, 1]  # one module per device
    assert all(code == cuda_launcher.kernel_source() and opts == cuda_launcher.nvrtc_options()
               for _, code, opts in built)


ParamSpec = namedtuple("ParamSpec", "dtype device shape layout frozen hook lr momentum loss_scale")


def _param_specs(n_params, seed, per_parameter=True):
    """Random parameters: dtypes, devices 0/1, shapes (0-d and empty included), layouts, rules.

    ``per_parameter=False``: no rule hooks, strided or mixed layouts (nothing
    that keeps a parameter out of its group after the first step).
    """
    rng = np.random.default_rng(seed)
    specs = []
    extras = n_params > 1
    for i in range(n_params):
        dtype = DTYPES[int(rng.integers(3))]
        device = int(rng.integers(2))
        r = rng.random()
        if r < 0.04 and extras:
            shape = ()
        elif r < 0.07 and extras:
            shape = (0,) if rng.random() < 0.5 else (3, 0)
        elif r < 0.10 and extras:
            shape = (int(rng.integers(5000, 30000)),)
        elif r < 0.5:
            shape = (int(rng.integers(1, 700)),)
        else:
            shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        layout = "C"
        if extras and len(shape) == 2 and min(shape) > 1:
            layout = str(rng.choice(["C", "C", "C", "F", "F", "strided", "F/C"]))
        frozen = extras and rng.random() < 0.06
        hook = extras and rng.random() < 0.06
        lr = float(10 ** rng.uniform(-4, -1)) if extras and rng.random() < 0.2 else None
        momentum = float(rng.uniform(0.5, 0.99)) if extras and rng.random() < 0.2 else None
        scale = None
        if extras and rng.random() < 0.3:
            # 0-d gradients: powers of two only (see test_zero_dim_loss_scale_...).
            scale = (float(2 ** int(rng.integers(-3, 10))) if shape == ()
                     else LOSS_SCALES[int(rng.integers(len(LOSS_SCALES)))])
        specs.append(ParamSpec(dtype, device, shape, layout, frozen, hook, lr, momentum, scale))
    if n_params == 1:
        specs[0] = specs[0]._replace(shape=(1000,), layout="C")
    if n_params == 7:  # one of each kind at least
        specs[1] = specs[1]._replace(frozen=True)
        specs[3] = specs[3]._replace(hook=True)
        specs[5] = specs[5]._replace(shape=(), layout="C", loss_scale=4.0)
        specs[6] = specs[6]._replace(shape=(6, 9), layout="strided")
    if not per_parameter:
        specs = [sp._replace(hook=False, layout="C" if sp.layout in ("strided", "F/C")
                             else sp.layout) for sp in specs]
    return specs


def _fake_array(fake, host, device, layout):
    """``host`` as a fake CuPy array of ``layout`` (C, F or strided) on ``device``."""
    if layout == "F":
        return fake.new(np.asfortranarray(host), device)
    if layout == "strided":
        return fake.new(np.repeat(host, 2, axis=-1), device)[..., ::2]
    return fake.new(np.array(host, order="C"), device)  # (ascontiguousarray makes 0-d 1-d)


def _build_model(fake, specs, seed, hook_calls):
    rng = np.random.default_rng(seed)
    model = cynag.Chain()
    params = []
    for start in range(0, len(specs), 10):
        link = cynag.Link()
        with link.init_scope():
            for i, spec in enumerate(specs[start:start + 10]):
                host = random_values(rng, spec.dtype, int(np.prod(spec.shape)), (-2, 1),
                                     specials=False).reshape(spec.shape)
                p = cynag.Parameter(_fake_array(fake, host, spec.device,
                                                "C" if spec.layout == "F/C" else spec.layout))
                setattr(link, "p%02d" % i, p)
                params.append(p)
        with model.init_scope():
            setattr(model, "l%03d" % (start // 10), link)
    opt = cynag.optimizers.NesterovAG(lr=0.01, momentum=0.9).setup(model)
    for p, spec in zip(params, specs):
        rule = p.update_rule
        if spec.frozen:
            rule.enabled = False
        if spec.hook:
            def hook(rule, param, _calls=hook_calls):
                _calls.append(param.name)
            rule.add_hook(hook, name="count")
        if spec.lr is not None:
            rule.hyperparam.lr = spec.lr
        if spec.momentum is not None:
            rule.hyperparam.momentum = spec.momentum
        if spec.loss_scale is not None:
            p._loss_scale = spec.loss_scale
    return model, opt, params


def _set_grads(fake, params, specs, seed, step, in_place):
    rng = np.random.default_rng([seed, step])
    for p, spec in zip(params, specs):
        g = random_values(rng, spec.dtype, int(np.prod(spec.shape)), (-2, 1)).reshape(spec.shape)
        if in_place and p.grad is not None:
            p.grad[...] = g
        else:
            layout = "F" if spec.layout == "F/C" else spec.layout
            p.grad = _fake_array(fake, g, spec.device, layout)


def _expected_launches(params, specs):
    """Launches of one step after the first: one per (device, dtype) group, one per other param.

    Grouped: enabled, no rule hook, all three arrays C- or all F-contiguous,
    not empty.  The rest (hooks, strided or mixed layouts) are updated one by
    one: one launch each, none for an empty array.
    """
    groups, rest = set(), 0
    for p, spec in zip(params, specs):
        if spec.frozen or not p.array.size:
            continue
        arrays = (p.array, p.grad, p.update_rule.state["v"])
        dense = any(all(getattr(a.flags, f) for a in arrays)
                    for f in ("c_contiguous", "f_contiguous"))
        if spec.hook or not dense:
            rest += 1
        else:
            groups.add((spec.device, spec.dtype))
    return len(groups), rest


def _state_bits(params):
    out = []
    for p in params:
        v = p.update_rule.state["v"] if p.update_rule.state else None
        out.append(tuple(None if a is None else (a.get().tobytes(), a.dtype, a.shape)
                         for a in (p.array, p.grad, v)))
    return out


@pytest.mark.parametrize("n_params,per_parameter", [(1, False), (7, True), (300, True),
                                                    (300, False)],
                         ids=["1", "7", "300", "300-grouped-only"])
def test_optimizer_multi_tensor_launches_and_results_on_fake_cupy(fake_cupy, n_params,
                                                                  per_parameter):
    """cynag's optimizer on emulated GPU parameters: launches per step and bit-exact results.

    Models of 1, 7 and 300 parameters (float16/32/64 on devices 0 and 1,
    0-d and empty arrays, F-contiguous, strided and mixed-layout arrays,
    frozen parameters, rule hooks, per-rule lr and momentum, loss scales)
    are updated by ``NesterovAG.update()`` with the multi-tensor path and,
    from the same start, with ``use_multi_tensor(False)``.  After the first
    step (which creates the state through the per-parameter path), a step
    launches one kernel per (device, dtype) group plus one per parameter
    left in the per-parameter path; parameters, gradients (divided by the
    loss scale) and ``v`` are equal bit for bit after every step.  Steps
    replace the gradient arrays, write them in place and change a
    hyperparameter.
    """
    seed = 1000 + n_params
    specs = _param_specs(n_params, seed, per_parameter)
    calls_a, calls_b = [], []
    model_a, opt_a, params_a = _build_model(fake_cupy, specs, seed, calls_a)
    model_b, opt_b, params_b = _build_model(fake_cupy, specs, seed, calls_b)
    opt_b.use_multi_tensor(False)
    assert _state_bits(params_a) == _state_bits(params_b)
    enabled = sum(1 for p, s in zip(params_a, specs) if not s.frozen and p.array.size)
    for step in range(6):
        # Step 1 builds the plan (the state exists now), step 2 replaces the
        # gradients of a built plan, 3 and 5 write them in place, 4 changes
        # hyperparameters too.
        in_place = step in (3, 5)
        if step == 4:
            opt_a.lr = opt_b.lr = 0.02
            opt_a.momentum = opt_b.momentum = 0.8
        for params in (params_a, params_b):
            _set_grads(fake_cupy, params, specs, seed, step, in_place)
        del fake_cupy.launches[:]
        opt_a.update()
        launches_a = list(fake_cupy.launches)
        del fake_cupy.launches[:]
        opt_b.update()
        launches_b = list(fake_cupy.launches)
        assert len(launches_b) == enabled, (step, launches_b)
        multi = [l for l in launches_a if l[0] in cuda_launcher.MULTI_KERNEL_NAMES.values()]
        if step == 0:
            assert launches_a == launches_b  # the first update creates v, per parameter
        else:
            n_groups, n_rest = _expected_launches(params_a, specs)
            assert (len(multi), len(launches_a) - len(multi)) == (n_groups, n_rest), (
                step, launches_a, opt_a.multi_tensor_plan())
            assert len(set(multi)) == len(multi)  # at most one launch per (kernel, device)
            if not per_parameter:
                assert len(launches_a) == n_groups <= 6  # two devices, three dtypes
        assert calls_a == calls_b
        bits_a, bits_b = _state_bits(params_a), _state_bits(params_b)
        bad = [(i, specs[i]) for i in range(n_params) if bits_a[i] != bits_b[i]]
        assert not bad, "step %d: %d parameters differ, first: %s" % (step, len(bad), bad[:3])
    assert opt_a.t == opt_b.t == 6
    for p in params_a:
        assert p.update_rule.t == (0 if p.update_rule.enabled is False else 6)


def _run_both(fake, specs, seed, steps, before_step=None):
    """Run the model of ``specs`` with and without the multi-tensor path; per-step launches."""
    runs = []
    for multi in (True, False):
        model, opt, params = _build_model(fake, specs, seed, [])
        opt.use_multi_tensor(multi)
        launches = []
        for step in range(steps):
            _set_grads(fake, params, specs, seed, step, in_place=False)
            if before_step is not None:
                before_step(step, model, params)
            del fake.launches[:]
            opt.update()
            launches.append(list(fake.launches))
        runs.append((params, launches))
    return runs


def test_cleared_gradients_of_a_whole_group(fake_cupy):
    """A group whose gradients are all cleared: zeros, one launch, as the per-parameter path.

    (The plan builds a table over the parameters that have a gradient, none
    here: GPUTable takes an empty list, as CPUTable does.)
    """
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    specs = [ParamSpec(f32, 0, (50,), "C", False, False, None, None, None),
             ParamSpec(f32, 0, (3, 4), "F", False, False, None, None, 2.0),
             ParamSpec(f64, 0, (7,), "C", False, False, None, None, None)]

    def clear(step, model, params):
        if step >= 2:
            params[0].cleargrad()
            params[1].cleargrad()

    (params_a, launches_a), (params_b, launches_b) = _run_both(fake_cupy, specs, 5, 5, clear)
    assert _state_bits(params_a) == _state_bits(params_b)
    assert [len(l) for l in launches_b] == [3] * 5
    assert [len(l) for l in launches_a] == [3, 2, 2, 2, 2]
    assert all((p.grad.get() == 0).all() for p in params_a[:2])


def test_cleared_gradient_of_a_device_1_parameter_is_reallocated_on_device_1(fake_cupy):
    f32 = np.dtype(np.float32)
    specs = [ParamSpec(f32, 1, (50,), "C", False, False, None, None, None)]

    def clear(step, model, params):
        if step >= 2:
            model.cleargrads()

    (params_a, _), (params_b, _) = _run_both(fake_cupy, specs, 6, 4, clear)
    assert params_a[0].grad.device.id == params_b[0].grad.device.id == 1
    assert _state_bits(params_a) == _state_bits(params_b)


def test_zero_dim_gradient_with_a_loss_scale_the_dtype_does_not_hold(fake_cupy):
    f16 = np.dtype(np.float16)
    specs = [ParamSpec(f16, 0, (), "C", False, False, None, None, 0.7)]

    def grad(step, model, params):
        params[0].grad[...] = np.float16(1.08e-05)  # float16(g / 0.7) != g / float16(0.7)

    (params_a, _), (params_b, _) = _run_both(fake_cupy, specs, 7, 3, grad)
    assert _state_bits(params_a) == _state_bits(params_b)


# ---------------------------------------------------------------------------
# The hook launchers on an emulated CuPy
# ---------------------------------------------------------------------------
def _hook_layouts(fake, hg, hp, dev, layout):
    """Fake arrays for host ``hg``/``hp`` (2-d) in ``layout``; ``hp`` may be None."""
    def make(h, lay):
        if h is None:
            return None
        if lay == "F":
            return fake.new(np.asfortranarray(h), dev)
        if lay == "strided":
            return fake.new(np.repeat(h, 2, axis=1), dev)[:, ::2]
        return fake.new(h.copy(), dev)
    lg, lp = {"C": ("C", "C"), "F": ("F", "F"), "strided": ("strided", "strided"),
              "C/F": ("C", "F"), "strided/C": ("strided", "C")}[layout]
    return make(hg, lg), make(hp, lp)


def test_fake_cupy_hook_ops_gpu(fake_cupy):
    """hook_ops_gpu: one launch on the arrays' device, apply_ops's bits, in every layout.

    Programs reading the parameter, the noise, or nothing (``p=None``);
    C, F, strided and mixed layouts; devices 0 and 1; p unchanged.
    """
    rng = np.random.default_rng(31)
    for dev in (0, 1):
        for dtype in DTYPES:
            rlog = LOG10_RANGES[dtype]
            for li, layout in enumerate(("C", "F", "strided", "C/F", "strided/C")):
                hg = random_values(rng, dtype, 12 * 35, rlog).reshape(12, 35)
                hparam = random_values(rng, dtype, 12 * 35, rlog).reshape(12, 35)
                hnoise = random_values(rng, dtype, 12 * 35, rlog).reshape(12, 35)
                programs = [(random_program(rng, dtype, hparam, "param", 4), hparam),
                            (random_program(rng, dtype, hnoise, "noise", 3), hnoise),
                            ([("clip", -0.5, 0.5), ("scale", 0.25)], None)]
                for ops, hp in programs:
                    want = hook_reference(hg, hp, ops)
                    g, p = _hook_layouts(fake_cupy, hg, hp, dev, layout)
                    del fake_cupy.launches[:]
                    cuda_launcher.hook_ops_gpu(g, p, hook_rows(dtype, ops))
                    assert fake_cupy.launches == [(cuda_launcher.HOOK_KERNEL_NAMES[dtype], dev)]
                    where = (dev, dtype, layout, ops[0][0])
                    assert mismatches(g.get(), want).size == 0, where
                    if hp is not None:
                        assert _bits(p.get()).tobytes() == _bits(hp).tobytes(), where
    assert [d for d, _, _ in fake_cupy.modules_built] == [0, 1]
    assert all(code == cuda_launcher.kernel_source() for _, code, _ in fake_cupy.modules_built)


def test_fake_cupy_hook_ops_gpu_aliasing_and_programs_split_at_the_noise(fake_cupy):
    """p = g, p overlapping g, and apply_ops's mixed program as three launches: apply_ops's bits."""
    rng = np.random.default_rng(32)
    for dtype in DTYPES:
        rlog = LOG10_RANGES[dtype]
        ops = [("weight_decay", 0.3), ("lasso", -0.01)]
        # p is g: NumPy (and apply_ops) read p before writing g.
        hg = random_values(rng, dtype, 500, rlog)
        want = hg.copy()
        cpu_hooks.apply_ops(want, want, ops)
        g = fake_cupy.new(hg.copy())
        del fake_cupy.launches[:]
        cuda_launcher.hook_ops_gpu(g, g, hook_rows(dtype, ops))
        assert len(fake_cupy.launches) == 1
        assert mismatches(g.get(), want).size == 0, dtype
        # p overlapping g shifted by one element.
        hb = random_values(rng, dtype, 501, rlog)
        want_b = hb.copy()
        cpu_hooks.apply_ops(want_b[:-1], want_b[1:], ops)
        b = fake_cupy.new(hb.copy())
        cuda_launcher.hook_ops_gpu(b[:-1], b[1:], hook_rows(dtype, ops))
        assert mismatches(b.get(), want_b).size == 0, dtype
        # A program reading the parameter and the noise: apply_ops runs it in one call;
        # on the GPU it is one launch per source, in order.
        hg = random_values(rng, dtype, 700, rlog)
        hparam = random_values(rng, dtype, 700, rlog)
        hnoise = random_values(rng, dtype, 700, rlog)
        mixed = [("weight_decay", 5e-4), ("add", hnoise), ("clip", -1.0, 1.0), ("scale", 0.5)]
        want = hg.copy()
        cpu_hooks.apply_ops(want, hparam, mixed)
        g, param, noise = (fake_cupy.new(h.copy()) for h in (hg, hparam, hnoise))
        del fake_cupy.launches[:]
        cuda_launcher.hook_ops_gpu(g, param, hook_rows(dtype, mixed[:1]))
        cuda_launcher.hook_ops_gpu(g, noise, hook_rows(dtype, mixed[1:2]))
        cuda_launcher.hook_ops_gpu(g, None, hook_rows(dtype, mixed[2:]))
        assert len(fake_cupy.launches) == 3
        assert mismatches(g.get(), want).size == 0, dtype


def test_fake_cupy_hook_ops_gpu_rows_cache_and_errors(fake_cupy):
    """A program is copied to each device once; bad arguments raise before any launch."""
    assert cuda_launcher.HOOK_OP_CODES == cpu_hooks.OP_CODES
    f32 = np.dtype(np.float32)
    rows = hook_rows(f32, [("weight_decay", 1e-4)])
    g0, p0 = fake_cupy.new(np.ones(10, f32), 0), fake_cupy.new(np.ones(10, f32), 0)
    g1, p1 = fake_cupy.new(np.ones(10, f32), 1), fake_cupy.new(np.ones(10, f32), 1)
    start = fake_cupy.uploads
    for _ in range(3):
        cuda_launcher.hook_ops_gpu(g0, p0, rows)
    assert fake_cupy.uploads == start + 1
    cuda_launcher.hook_ops_gpu(g1, p1, rows)  # another device: its own copy
    cuda_launcher.hook_ops_gpu(g0, p0, hook_rows(f32, [("weight_decay", 2e-4)]))
    assert fake_cupy.uploads == start + 3
    for k in range(cuda_launcher.ROWS_CACHE_SIZE + 5):
        cuda_launcher.hook_ops_gpu(g0, None, hook_rows(f32, [("scale", 1.0 + k)]))
    assert len(cuda_launcher._rows_cache) == cuda_launcher.ROWS_CACHE_SIZE
    del fake_cupy.launches[:]
    # Nothing to do: no launch.
    cuda_launcher.hook_ops_gpu(g0, p0, np.zeros((0, 4)))
    empty = fake_cupy.new(np.ones(0, f32))
    cuda_launcher.hook_ops_gpu(empty, empty, rows)
    bad = [
        ((g0, None, rows), ValueError, "p is None"),
        ((g0, fake_cupy.new(np.ones(10, np.float64)), rows), ValueError, "dtype"),
        ((g0, fake_cupy.new(np.ones(11, f32)), rows), ValueError, "shape"),
        ((g0, p1, rows), ValueError, "GPU 0 but p is on GPU 1"),
        ((g0, np.ones(10, f32), rows), TypeError, "CuPy array"),
        ((np.ones(10, f32), p0, rows), TypeError, "CuPy array"),
        ((fake_cupy.new(np.ones(10, np.int32)),) * 2 + (rows,), TypeError, "float16"),
        ((g0, p0, [[7.0, 0, 0, 0]]), ValueError, "row 0"),
        ((g0, p0, [[3.0, 0, 0, 4.0]]), ValueError, "row 0"),
        ((g0, p0, [[math.nan, 0, 0, 0]]), ValueError, "row 0"),
        ((g0, p0, [1.0, 0, 0, 0]), ValueError, "rows of 4"),
    ]
    before = g0.get()
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            cuda_launcher.hook_ops_gpu(*args)
    assert fake_cupy.launches == []
    assert g0.get().tobytes() == before.tobytes()


def test_fake_cupy_sum_squares_gpu(fake_cupy):
    """sum_squares_gpu: one launch per dtype (a table, or one array), one cupy.sum, 1e-12.

    float32 arrays in every layout (C, F, strided, 0-d, empty) go through a
    table; a lone float16 array through the single-array kernel; several
    float64 arrays through a table.  The total agrees with the exact sum and
    with ``cynag_kernels.hooks.sum_squares`` to 1e-12.
    """
    rng = np.random.default_rng(33)
    f16, f32, f64 = (np.dtype(t) for t in (np.float16, np.float32, np.float64))
    for dev in (0, 1):
        host = [random_values(rng, f32, 12 * 35, (-3, 3), specials=False).reshape(12, 35)
                for _ in range(3)]
        arrays = [fake_cupy.new(host[0].copy(), dev),
                  fake_cupy.new(np.asfortranarray(host[1]), dev),
                  fake_cupy.new(np.repeat(host[2], 2, axis=1), dev)[:, ::2]]
        extra = [np.array(3.5, f32), np.zeros((0, 3), f32),
                 random_values(rng, f16, 40_000, (-3, 2), specials=False),
                 random_values(rng, f64, 20_000, (-8, 8), specials=False),
                 random_values(rng, f64, 9, (-1, 1), specials=False)]
        host += extra
        arrays += [fake_cupy.new(h.copy(), dev) for h in extra]
        order = rng.permutation(len(arrays))
        arrays = [arrays[i] for i in order]
        host = [host[i] for i in order]
        del fake_cupy.launches[:]
        del fake_cupy.reductions[:]
        with fake_cupy.module.cuda.Device(1 - dev):  # another current device must not matter
            got = cuda_launcher.sum_squares_gpu(arrays)
        assert type(got) is float
        assert sorted(fake_cupy.launches) == sorted([
            (cuda_launcher.SUM_SQUARES_KERNEL_NAMES[f16], dev),
            (cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES[f32], dev),
            (cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES[f64], dev)])
        assert len(fake_cupy.reductions) == 1 and fake_cupy.reductions[0][0] == f64
        assert fake_cupy.reductions[0][2] == dev
        want = exact_sum_squares(host)
        assert _relative_problem(got, want) is None, (got, want)
        assert _relative_problem(got, cpu_hooks.sum_squares(host)) is None
        for h, a in zip(host, arrays):  # nothing written
            assert _bits(a.get()).tobytes() == _bits(np.ascontiguousarray(h)).tobytes()
    # One array: the single-array kernel.
    del fake_cupy.launches[:]
    x = random_values(rng, f32, 5000, (-2, 2), specials=False)
    got = cuda_launcher.sum_squares_gpu([fake_cupy.new(x.copy(), 1)])
    assert fake_cupy.launches == [(cuda_launcher.SUM_SQUARES_KERNEL_NAMES[f32], 1)]
    assert _relative_problem(got, exact_sum_squares([x])) is None
    # Nothing to sum: no launch.
    del fake_cupy.launches[:]
    assert cuda_launcher.sum_squares_gpu([]) == 0.0
    assert cuda_launcher.sum_squares_gpu([fake_cupy.new(np.zeros(0, f32))]) == 0.0
    assert fake_cupy.launches == []
    a0, a1 = fake_cupy.new(np.ones(3, f32), 0), fake_cupy.new(np.ones(3, f32), 1)
    with pytest.raises(ValueError, match="array 0 is on GPU 0 but array 1 is on GPU 1"):
        cuda_launcher.sum_squares_gpu([a0, a1])
    with pytest.raises(TypeError, match="array 1 is int32"):
        cuda_launcher.sum_squares_gpu([a0, fake_cupy.new(np.ones(3, np.int32))])
    with pytest.raises(TypeError, match="CuPy array"):
        cuda_launcher.sum_squares_gpu([np.ones(3, f32)])
    assert fake_cupy.launches == []


def test_folded_hooks_run_in_the_one_launch_per_group(fake_cupy):
    """Optimizer hooks folded into the GPU pass: still one launch per (device, dtype)
    group per step (the multi-tensor kernel with an operation program), and the
    same bits as the hooks run one launch at a time before the per-parameter
    update (``use_multi_tensor(False)``)."""
    from cynag import optimizer_hooks as H

    f16, f32, f64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
    specs = [ParamSpec(f32, 0, (50,), "C", False, False, None, None, None),
             ParamSpec(f32, 0, (3, 4), "F", False, False, None, None, None),
             ParamSpec(f64, 0, (7,), "C", False, False, None, None, None),
             ParamSpec(f16, 1, (33,), "C", False, False, None, None, None),
             ParamSpec(f32, 1, (9,), "C", False, False, None, None, None)]
    orders = ([H.WeightDecay(1e-2)],
              [H.GradientClipping(0.5), H.WeightDecay(1e-2), H.Lasso(1e-3),
               H.GradientHardClipping(-0.05, 0.05)])
    for hooks in orders:
        runs = []
        for multi in (True, False):
            model, opt, params = _build_model(fake_cupy, specs, 11, [])
            opt.use_multi_tensor(multi)
            for h in hooks:
                opt.add_hook(h)
            launches = []
            for step in range(4):
                _set_grads(fake_cupy, params, specs, 11, step, in_place=False)
                del fake_cupy.launches[:]
                opt.update()
                launches.append([l[0] for l in fake_cupy.launches])
            runs.append((params, launches))
        (params_a, launches_a), (params_b, launches_b) = runs
        assert _state_bits(params_a) == _state_bits(params_b), [h.name for h in hooks]
        updates = [[n for n in step if n in cuda_launcher.MULTI_OPS_KERNEL_NAMES.values()]
                   for step in launches_a[1:]]
        assert all(len(u) == 4 for u in updates), updates  # 4 (device, dtype) groups
        others = [[n for n in step if n in cuda_launcher.HOOK_KERNEL_NAMES.values()
                   or n in cuda_launcher.MULTI_KERNEL_NAMES.values()
                   or n in cuda_launcher.KERNEL_NAMES.values()] for step in launches_a[1:]]
        assert all(not o for o in others), others  # no separate hook or update launches
