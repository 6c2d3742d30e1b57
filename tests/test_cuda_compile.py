"""The CUDA source compiles with NVRTC for sm_75, sm_80 and sm_90, without a GPU.

``cynag_kernels.cuda.kernel_source()`` -- exactly the text the launcher gives
to ``cupy.RawModule`` -- is compiled by NVRTC from PyPI wheels (see
``cuda_env.py``: no GPU, no driver and no system CUDA toolkit needed) with the
options CuPy's RawModule passes on a device of that compute capability
(CuPy's own ``assemble_cupy_compiler_options`` applied to
``cynag_kernels.cuda.nvrtc_options()``, then ``-ftz=true``, ``-arch=sm_XX``
and ``--device-as-default-execution-space``) plus ``--ptxas-options=-v``, all
architectures in one subprocess.  For every architecture and every entry
point of ``KERNEL_NAMES``:

* the entry point is in the PTX unmangled (``.visible .entry NAME(``) with the
  parameter types that ``kernel_args`` passes (pointers, ``lr``/``momentum``
  of ``SCALAR_TYPES``, 64-bit ``n``);
* ptxas compiled it for that architecture; its registers and spills are
  reported, and any spill store or load fails the test;
* the index arithmetic is 64-bit (see :func:`index_width_problems`; a probe
  kernel with an ``int`` index shows that the check catches the 32-bit form).

The same holds for every entry point of ``MULTI_KERNEL_NAMES``: unmangled,
four 64-bit parameters (``table``, ``coef``, ``n_tensors``, ``n_items`` as
``GPUTable.run`` passes them), no spills, no stack frame, both counts and
the inner element loop in 64 bits (a probe with an ``int`` inner index is
caught).

The kernels of the optimizer hooks (``hooks.cu``, in the same module) are
checked the same way: ``HOOK_KERNEL_NAMES`` take ``(g, p, n, ops, n_ops)``,
all 64-bit, with both counts in 64 bits, the rows read as doubles and, for
float16, a rounding to half after the operations;
``SUM_SQUARES_KERNEL_NAMES`` take ``(x, n, partial)`` and accumulate in
double; ``SUM_SQUARES_MULTI_KERNEL_NAMES`` take ``(table, partial,
n_tensors, n_items)``.  None of them uses shared memory, barriers, atomics or
warp shuffles (what the emulator cannot run).

A probe kernel squeezed into 16 registers shows that the spill parsing sees
spills.

Broken copies of the source must fail to compile, with the error reported
against the file and line where the broken code is (``hooks.cu`` at the end,
``nesterov_ag.cu`` before the ``hooks.cu`` part: the ``#line`` directives of
``kernel_source()``), which shows that the harness can fail and that messages
point at the file.

The table of registers and spills is printed in the terminal summary (and is
in the failure messages).  ``CYNAG_SKIP_CUDA_COMPILE=1`` skips these tests when
the NVRTC environment cannot be set up.
"""
import os
import re

import numpy
import pytest

from cuda_env import PINNED, CudaEnvError, run_compile_job, venv_dir
from cuda_env import cuda_compile_python  # noqa: F401  (session fixture)
from cynag_kernels import cuda as cuda_launcher

ARCHS = ("75", "80", "90")
#: Name given to NVRTC for the program (CuPy uses a temporary ``<hash>.cu``);
#: errors must name the ``#line`` file instead.
PROGRAM_NAME = "cynag_rawmodule.cu"
KERNELS = tuple(sorted(cuda_launcher.KERNEL_NAMES.items(), key=lambda kv: kv[1]))
MULTI_KERNELS = tuple(sorted(cuda_launcher.MULTI_KERNEL_NAMES.items(), key=lambda kv: kv[1]))
HOOK_KERNELS = tuple(sorted(cuda_launcher.HOOK_KERNEL_NAMES.items(), key=lambda kv: kv[1]))
SUM_KERNELS = tuple(sorted(cuda_launcher.SUM_SQUARES_KERNEL_NAMES.items(), key=lambda kv: kv[1]))
SUM_MULTI_KERNELS = tuple(sorted(cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES.items(),
                                 key=lambda kv: kv[1]))
MULTI_OPS_KERNELS = tuple(sorted(cuda_launcher.MULTI_OPS_KERNEL_NAMES.items(),
                                 key=lambda kv: kv[1]))
ALL_KERNELS = (KERNELS + MULTI_KERNELS + HOOK_KERNELS + SUM_KERNELS + SUM_MULTI_KERNELS
               + MULTI_OPS_KERNELS)
_PTX_TYPE = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}

#: Small kernels that check the 64-bit index check itself (arch sm_80).
PROBE_SOURCE = r"""
extern "C" __global__ void probe_index32(float* x, long long n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        x[i] *= 2.0f;
}
extern "C" __global__ void probe_n32(float* x, int n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        x[i] *= 2.0f;
}
extern "C" __global__ void probe_index64(float* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        x[i] *= 2.0f;
}
extern "C" __global__ void probe_inner32(float* x, const long long* b, long long n_items) {
    for (long long item = blockIdx.x; item < n_items; item += gridDim.x)
        for (int i = (int)b[item] + threadIdx.x; i < b[item + 1]; i += blockDim.x)
            x[i] *= 2.0f;
}
extern "C" __global__ void probe_inner64(float* x, const long long* b, long long n_items) {
    for (long long item = blockIdx.x; item < n_items; item += gridDim.x)
        for (long long i = b[item] + threadIdx.x; i < b[item + 1]; i += blockDim.x)
            x[i] *= 2.0f;
}
"""

#: A kernel that spills under ``--maxrregcount=16`` (checks the spill parsing).
SPILL_PROBE_SOURCE = r"""
extern "C" __global__ void probe_spill(float* x, long long n) {
    float a[48];
    #pragma unroll
    for (int k = 0; k < 48; ++k) a[k] = x[k * n + threadIdx.x];
    float s = 0.0f;
    #pragma unroll
    for (int k = 0; k < 48; ++k) s += a[k] * a[47 - k] + a[(k * 7) % 48];
    x[threadIdx.x] = s;
}
"""


#: A kernel with shared memory, a barrier and an atomic (checks the cooperation check).
COOPERATION_PROBE_SOURCE = r"""
extern "C" __global__ void probe_cooperation(float* x, long long n) {
    __shared__ float buf[256];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    atomicAdd(x + n, buf[255 - threadIdx.x]);
}
"""

BROKEN = "cynag_broken_on_purpose x;\n"


def _broken_source(where="end"):
    """kernel_source() with an undeclared identifier; (source, file, line of the error).

    ``where="end"``: after the last file of ``SOURCE_FILES``; ``"first"``: at
    the end of the first file's part (before the next ``#line``).
    """
    src = cuda_launcher.kernel_source()
    assert src.endswith("\n")
    starts = [m.start() for m in re.finditer(r'^#line 1 "', src, re.M)]
    assert len(starts) == len(cuda_launcher.SOURCE_FILES) >= 2, starts
    if where == "end":
        cut, path = len(src), cuda_launcher.SOURCE_FILES[-1]
    else:
        cut, path = starts[1], cuda_launcher.SOURCE_FILES[0]
    part = src[src.rindex("#line 1 ", 0, cut):cut]
    # Line 1 of the file is the line after the #line directive.
    line = part.count("\n")  # = lines of the file + 1 (the directive's line)
    return src[:cut] + BROKEN + src[cut:], path, line


# ---------------------------------------------------------------------------
# Parsing: ptxas -v log and PTX
# ---------------------------------------------------------------------------
_RE_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_PROPERTIES = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log):
    """{entry: {"arch", "registers", "stack", "spill_stores", "spill_loads"}} from ptxas -v."""
    entries = {}
    entry = props = None
    for line in log.splitlines():
        m = _RE_COMPILING.search(line)
        if m:
            entry = m.group(1)
            entries[entry] = {"arch": m.group(2)}
            continue
        m = _RE_PROPERTIES.search(line)
        if m:
            props = m.group(1)
            continue
        m = _RE_FRAME.search(line)
        if m and props in entries:
            entries[props].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
            continue
        m = _RE_USED.search(line)
        if m and entry is not None:
            entries[entry]["registers"] = int(m.group(1))
    return entries


def spill_problem(info):
    """Why the ptxas report ``info`` of one entry is not spill-free (None if it is)."""
    if "spill_stores" not in info or "spill_loads" not in info:
        return "ptxas reported no spill figures"
    if info["spill_stores"] or info["spill_loads"]:
        return "%d bytes spill stores, %d bytes spill loads" % (info["spill_stores"],
                                                                info["spill_loads"])
    return None


def ptx_entry(ptx, name):
    """(parameter types, body) of the entry ``name`` in ``ptx``, or None."""
    m = re.search(r"\.visible\s+\.entry\s+%s\s*\((.*?)\)\s*\{" % re.escape(name), ptx, re.S)
    if m is None:
        return None
    params = re.findall(r"\.param\s+\.(\w+)\s+%s_param_(\d+)" % re.escape(name), m.group(1))
    types = [t for t, _ in sorted(params, key=lambda p: int(p[1]))]
    # The body ends at the first closing brace at the start of a line.
    end = re.search(r"^\}", ptx[m.end():], re.M)
    body = ptx[m.end():m.end() + (end.start() if end else len(ptx))]
    return types, body


_SPECIAL = ("ctaid", "ntid", "nctaid")
#: Also threadIdx.x: adding it to a 32-bit value forms a 32-bit index.
_SPECIAL_ADD = _SPECIAL + ("tid",)


def index_width_problems(ptx, name, counts=None):
    """Reasons why the index arithmetic of entry ``name`` is not 64-bit ([] if it is).

    ``counts`` are the indices of the parameters that bound the loops
    (element or item counts); by default the last parameter, the element
    count ``n`` as ``kernel_args`` passes it (the multi-tensor kernels pass
    ``n_tensors`` and ``n_items``, parameters 2 and 3).  The check, on the
    PTX:

    1. each count is a 64-bit parameter (``.u64``/``.s64``/``.b64``);
    2. the register it is loaded into is never narrowed to 32 bits
       (``cvt.u32.u64``/``cvt.s32.s64`` of it), and every comparison reading
       it is a 64-bit ``setp`` -- there is at least one, the loop's ``i < n``;
    3. ``blockIdx.x * blockDim.x`` and ``blockDim.x * gridDim.x`` are not
       formed in 32 bits: no ``mul.lo``/``mad.lo``/``mul24``/``mad24`` of
       ``.s32``/``.u32`` type reads a register moved from ``%ctaid.x``,
       ``%ntid.x`` or ``%nctaid.x``.  A 64-bit index gives ``mul.wide.u32``
       (exact 64-bit product) or 64-bit ``mul.lo.s64``; the classic
       ``int i = blockIdx.x * blockDim.x + threadIdx.x`` gives ``mad.lo.s32``;
    4. no 32-bit ``add``/``sub`` reads one of those registers or
       ``%tid.x``: an ``int`` index ``i = start + threadIdx.x``, ``i +=
       blockDim.x`` (the multi-tensor kernels' inner loop) gives ``add.s32``.

    Points 3 and 4 are what catch an ``int`` loop index compared with a
    64-bit bound (the comparison itself is then 64-bit after sign extension);
    :func:`test_index_check_catches_32_bit_indexing` shows they do.
    """
    entry = ptx_entry(ptx, name)
    if entry is None:
        return ["entry %s not in the PTX" % name]
    types, body = entry
    problems = []
    if counts is None:
        counts = (len(types) - 1,)
    for n_index in counts:
        if not 0 <= n_index < len(types) or types[n_index] not in ("u64", "s64", "b64"):
            problems.append("count parameter %d is .%s, not 64-bit"
                            % (n_index, types[n_index] if 0 <= n_index < len(types) else "?"))
        n_regs = re.findall(r"ld\.param\.\w+\s+(%%\w+),\s*\[%s_param_%d\]"
                            % (re.escape(name), n_index), body)
        if not n_regs:
            problems.append("count parameter %d is never loaded" % n_index)
        for reg in n_regs:
            r = re.escape(reg)
            if re.search(r"cvt(\.\w+)*\.[us](8|16|32)\.[usb]64\s+%\w+,\s*" + r + r"\s*;", body):
                problems.append("count parameter %d (%s) is narrowed to 32 bits" % (n_index, reg))
            compares = [(t, ops) for t, ops in re.findall(r"setp\.\w+\.(\w+)\s+[^,]+,\s*([^;]+);",
                                                          body)
                        if re.search(r + r"\b", ops)]
            if not compares:
                problems.append("count parameter %d (%s) is never compared" % (n_index, reg))
            for t, ops in compares:
                if t not in ("s64", "u64", "b64"):
                    problems.append("count parameter %d (%s) is compared as .%s: setp %s"
                                    % (n_index, reg, t, ops.strip()))

    def moved_from(specials):
        regs = {reg for reg, _ in re.findall(r"mov\.u32\s+(%%\w+),\s*%%(%s)\.x\b"
                                             % "|".join(specials), body)}
        return regs | {"%%%s.x" % s for s in specials}

    special_regs = moved_from(_SPECIAL)
    for m in re.finditer(r"\b(mul|mad)(\.lo|24\.lo|24\.hi|\.hi)?\.([us]32)\s+([^;]+);", body):
        operands = [o.strip() for o in m.group(4).split(",")][1:]
        hits = [o for o in operands if o in special_regs]
        if hits and m.group(2) in (".lo", "24.lo", None):
            problems.append("32-bit index arithmetic on %s: %s" % (", ".join(hits),
                                                                     m.group(0)))
    add_regs = moved_from(_SPECIAL_ADD)
    for m in re.finditer(r"\b(add|sub)(\.cc)?\.([us]32)\s+([^;]+);", body):
        operands = [o.strip() for o in m.group(4).split(",")][1:]
        hits = [o for o in operands if o in add_regs]
        if hits:
            problems.append("32-bit index arithmetic on %s: %s" % (", ".join(hits), m.group(0)))
    return problems


# ---------------------------------------------------------------------------
# The compile job: one subprocess for everything
# ---------------------------------------------------------------------------
class _Report:
    """Terminal-summary plugin that prints the register/spill table."""

    def __init__(self, text):
        self.text = text

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", "cynag CUDA compile (NVRTC, ptxas -v)")
        terminalreporter.write_line(self.text)


def _table(result):
    rows = [("arch", "kernel", "registers", "stack", "spill stores", "spill loads")]
    for unit in result["units"]:
        if unit["label"] != "kernels":
            continue
        info = parse_ptxas_log(unit["log"])
        for _, name in ALL_KERNELS:
            e = info.get(name, {})
            rows.append(("sm_" + unit["arch"], name) + tuple(
                str(e.get(k, "?")) for k in ("registers", "stack", "spill_stores",
                                             "spill_loads")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    v = result["versions"]
    lines.append("NVRTC %d.%d (nvidia-cuda-nvrtc %s), cupy-cuda13x %s; CuPy options + "
                 "--ptxas-options=-v; compile %.2f s"
                 % (tuple(result["nvrtc_version"]) + (v["nvidia-cuda-nvrtc"],
                                                      v["cupy-cuda13x"],
                                                      sum(u["seconds"] for u in
                                                          result["units"]))))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled(request, cuda_compile_python, tmp_path_factory):
    broken, _, _ = _broken_source()
    broken_first, _, _ = _broken_source("first")
    units = [{"label": "kernels", "arch": a, "name": PROGRAM_NAME,
              "source": cuda_launcher.kernel_source()} for a in ARCHS]
    units.append({"label": "broken", "arch": "80", "name": PROGRAM_NAME, "source": broken})
    units.append({"label": "broken_first", "arch": "80", "name": PROGRAM_NAME,
                  "source": broken_first})
    units.append({"label": "probe", "arch": "80", "name": "probe.cu", "source": PROBE_SOURCE})
    units.append({"label": "cooperation_probe", "arch": "80", "name": "cooperation_probe.cu",
                  "source": COOPERATION_PROBE_SOURCE})
    units.append({"label": "spill_probe", "arch": "80", "name": "spill_probe.cu",
                  "source": SPILL_PROBE_SOURCE, "extra_options": ["--maxrregcount=16"]})
    job = {"options": list(cuda_launcher.nvrtc_options()),
           "extra_options": ["--ptxas-options=-v"], "units": units}
    try:
        result = run_compile_job(cuda_compile_python, job, tmp_path_factory.mktemp("nvrtc"))
    except CudaEnvError as e:
        pytest.fail(str(e), pytrace=False)
    result["table"] = _table(result)
    config = request.config
    if not getattr(config, "_cynag_cuda_report", False):
        config._cynag_cuda_report = True
        config.pluginmanager.register(_Report(result["table"]), "cynag-cuda-compile-report")
    return result


def _unit(result, label, arch=None):
    for unit in result["units"]:
        if unit["label"] == label and (arch is None or unit["arch"] == arch):
            return unit
    raise AssertionError("no compile result for %s %s" % (label, arch))


def _describe(unit):
    return "options: %s\nlog:\n%s" % (" ".join(unit["options"]), unit["log"])


def _inside(path, root):
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_toolchain_is_the_pinned_wheels(compiled):
    """NVRTC, its headers and CuPy come from the environment's wheels, not a system CUDA."""
    assert compiled["versions"] == dict(PINNED)
    d = venv_dir()
    lib = compiled["nvrtc_lib"]
    assert lib["path"] and _inside(lib["path"], d), lib
    assert lib["found_via"] == "site-packages", lib
    assert compiled["cuda_path"] and _inside(compiled["cuda_path"], d), compiled["cuda_path"]
    assert os.path.exists(os.path.join(compiled["cuda_path"], "include", "cuda_fp16.h"))
    include_dirs = [o[2:] for o in compiled["cupy_options"] if o.startswith("-I")]
    assert os.path.join(compiled["cuda_path"], "include") in include_dirs, include_dirs
    for arch in ARCHS:
        assert int(arch) in compiled["supported_archs"], compiled["supported_archs"]


def test_options_are_cupys_plus_the_launchers(compiled):
    """The launcher's options reach NVRTC, and CuPy adds no second language standard."""
    opts = compiled["cupy_options"]
    for o in cuda_launcher.nvrtc_options():
        assert o in opts, opts
    stds = [o for o in opts if o.lstrip("-").startswith("std=")]
    assert len(stds) == 1, stds
    unit = _unit(compiled, "kernels", "80")
    assert "-arch=sm_80" in unit["options"]
    assert "--device-as-default-execution-space" in unit["options"]
    assert "-ftz=true" in unit["options"]


@pytest.mark.parametrize("arch", ARCHS)
def test_source_compiles(compiled, arch):
    unit = _unit(compiled, "kernels", arch)
    assert unit["ok"], "NVRTC failed for sm_%s: %s\n%s" % (arch, unit["error"], _describe(unit))
    assert unit["cubin_size"] > 0
    # No warning from the compiler about cynag's own files.
    names = [os.path.basename(f) for f in cuda_launcher.SOURCE_FILES]
    warnings = [l for l in unit["log"].splitlines()
                if any(n in l for n in names) and "warning" in l]
    assert not warnings, _describe(unit)
    assert "'sm_%s'" % arch in unit["log"], _describe(unit)  # ptxas ran for that arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", KERNELS, ids=[n for _, n in KERNELS])
def test_entry_point(compiled, arch, dtype, name):
    """Unmangled entry with the launcher's argument types, no spills, 64-bit indices."""
    scalar = _PTX_TYPE[numpy.dtype(cuda_launcher.SCALAR_TYPES[dtype])]
    # param, grad, v (pointers), lr, momentum (SCALAR_TYPES), n (long long).
    _check_entry(compiled, arch, name, ["u64", "u64", "u64", scalar, scalar, "u64"],
                 counts=None, cooperation_ok=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", MULTI_KERNELS, ids=[n for _, n in MULTI_KERNELS])
def test_multi_entry_point(compiled, arch, dtype, name):
    """Multi-tensor entry: unmangled, (table, coef, n_tensors, n_items), no spills, 64-bit indices.

    All four parameters are 64-bit: the table and coefficient pointers, and
    the ``numpy.int64`` counts ``GPUTable.run`` passes; both counts bound
    loops that must not be narrowed to 32 bits.
    """
    body, context = _check_entry(compiled, arch, name, ["u64"] * 4, counts=(2, 3),
                                 cooperation_ok=True)
    # The coefficients are read as the kernel's scalar type (SCALAR_TYPES).
    scalar = _PTX_TYPE[numpy.dtype(cuda_launcher.SCALAR_TYPES[dtype])]
    assert re.search(r"ld\.global(\.nc)?\.%s\b" % scalar, body), (scalar, context)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", MULTI_OPS_KERNELS, ids=[n for _, n in MULTI_OPS_KERNELS])
def test_multi_ops_entry_point(compiled, arch, dtype, name):
    """Multi-tensor entry with folded hook operations: unmangled, (table, coef, n_tensors,
    n_items, ops, n_ops), all 64-bit, no spills, 64-bit counts."""
    body, context = _check_entry(compiled, arch, name, ["u64"] * 6, counts=(2, 3, 5),
                                 cooperation_ok=True)
    scalar = _PTX_TYPE[numpy.dtype(cuda_launcher.SCALAR_TYPES[dtype])]
    assert re.search(r"ld\.global(\.nc)?\.%s\b" % scalar, body), (scalar, context)
    # The operation rows are read as doubles.
    assert re.search(r"ld\.global(\.nc)?\.f64\b", body), context


#: PTX of what the emulator cannot run (threads of a block together).
_COOPERATION = re.compile(r"\.shared\b|\bbar(\.\w+)*\s|\bbarrier\b|\batom\.|\bred\.|\bshfl\.|"
                          r"\bvote\.|\bmatch\.|\bredux\.")


def _check_entry(compiled, arch, name, want_types, counts, cooperation_ok=False):
    """Shared checks of one entry; returns (PTX body, context).

    Unmangled with the parameter types ``want_types``, no spills or stack
    frame, 64-bit indices (``counts``: see :func:`index_width_problems`) and,
    unless ``cooperation_ok``, no shared memory, barriers, atomics or warp
    primitives.
    """
    unit = _unit(compiled, "kernels", arch)
    assert unit["ok"], "NVRTC failed for sm_%s: %s\n%s" % (arch, unit["error"], _describe(unit))
    context = "sm_%s %s\n%s\n%s" % (arch, name, compiled["table"], _describe(unit))
    entry = ptx_entry(unit["ptx"], name)
    assert entry is not None, "no '.visible .entry %s(' in the PTX: %s" % (name, context)
    types, body = entry
    assert types == want_types, (types, context)
    info = parse_ptxas_log(unit["log"]).get(name)
    assert info is not None, "ptxas reported nothing for %s: %s" % (name, context)
    assert info["arch"] == "sm_" + arch, context
    assert "registers" in info, context
    problem = spill_problem(info)
    assert problem is None, "%s spills on sm_%s (%s): %s" % (name, arch, problem, context)
    assert info["stack"] == 0, "stack frame of %d bytes: %s" % (info["stack"], context)
    problems = index_width_problems(unit["ptx"], name, counts=counts)
    assert not problems, "index arithmetic is not 64-bit: %s\n%s" % (problems, context)
    if cooperation_ok:
        return body, context
    m = _COOPERATION.search(body)
    assert m is None, "%s uses %r (shared memory, barriers, atomics or warp primitives): %s" % (
        name, m.group(0), context)
    return body, context


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", HOOK_KERNELS, ids=[n for _, n in HOOK_KERNELS])
def test_hook_entry_point(compiled, arch, dtype, name):
    """Hook operations: ``(g, p, n, ops, n_ops)``, unmangled, no spills, 64-bit n and n_ops.

    The rows are read as doubles from global memory; float16 elements are
    loaded and stored as halves and rounded to half after an operation
    (``cvt.rn.f16.f32``), float32/float64 elements computed in their type.
    """
    body, context = _check_entry(compiled, arch, name, ["u64"] * 5, counts=(2, 4))
    assert re.search(r"ld\.global(\.nc)?\.f64\b", body), context  # the rows
    if dtype == numpy.float16:
        assert re.search(r"ld\.global(\.nc)?\.(b16|u16)\b", body), context
        assert re.search(r"st\.global\.(b16|u16)\b", body), context
        assert "cvt.rn.f16.f32" in body, context
    else:
        t = _PTX_TYPE[numpy.dtype(dtype)]
        assert re.search(r"ld\.global(\.nc)?\.%s\b" % t, body), context
        assert re.search(r"st\.global\.%s\b" % t, body), context
        assert re.search(r"\b(add|fma\.rn|mul)(\.rn)?(\.ftz)?\.%s\b" % t, body), context


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", SUM_KERNELS, ids=[n for _, n in SUM_KERNELS])
def test_sum_squares_entry_point(compiled, arch, dtype, name):
    """Partial sums of squares: ``(x, n, partial)``, 64-bit n, squares added in double."""
    body, context = _check_entry(compiled, arch, name, ["u64"] * 3, counts=(1,))
    assert re.search(r"\b(fma\.rn|add(\.rn)?)\.f64\b", body), context
    assert re.search(r"st\.global\.f64\b", body), context


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,name", SUM_MULTI_KERNELS, ids=[n for _, n in SUM_MULTI_KERNELS])
def test_sum_squares_multi_entry_point(compiled, arch, dtype, name):
    """Over a table: ``(table, partial, n_tensors, n_items)``, both counts 64-bit, double sums."""
    body, context = _check_entry(compiled, arch, name, ["u64"] * 4, counts=(2, 3))
    assert re.search(r"\b(fma\.rn|add(\.rn)?)\.f64\b", body), context
    assert re.search(r"st\.global\.f64\b", body), context


def test_cooperation_check_sees_shared_memory_and_atomics(compiled):
    """The PTX pattern of the hook kernels' check matches a barrier, shared memory, atomics."""
    unit = _unit(compiled, "cooperation_probe")
    assert unit["ok"], _describe(unit)
    entry = ptx_entry(unit["ptx"], "probe_cooperation")
    assert entry is not None, _describe(unit)
    found = {m.group(0).strip() for m in _COOPERATION.finditer(entry[1])}
    assert any(f.startswith(".shared") for f in found), found
    assert any(f.startswith("bar") for f in found), found
    assert any(f.startswith(("atom.", "red.")) for f in found), found
    for _, name in HOOK_KERNELS + SUM_KERNELS:  # and it stays quiet on the real kernels
        body = ptx_entry(_unit(compiled, "kernels", "80")["ptx"], name)[1]
        assert _COOPERATION.search(body) is None, name


def test_index_check_catches_32_bit_indexing(compiled):
    """The 64-bit check flags an int index and an int n, and passes a long long index."""
    unit = _unit(compiled, "probe")
    assert unit["ok"], _describe(unit)
    assert index_width_problems(unit["ptx"], "probe_index64") == []
    i32 = index_width_problems(unit["ptx"], "probe_index32")
    assert any("32-bit index arithmetic" in p for p in i32), (i32, unit["ptx"])
    n32 = index_width_problems(unit["ptx"], "probe_n32")
    assert any("not 64-bit" in p for p in n32), (n32, unit["ptx"])
    # The multi-tensor kernels' inner loop: an int index over 64-bit item bounds.
    assert index_width_problems(unit["ptx"], "probe_inner64") == []
    inner32 = index_width_problems(unit["ptx"], "probe_inner32")
    assert any("32-bit index arithmetic" in p for p in inner32), (inner32, unit["ptx"])


def test_spill_check_catches_spills(compiled):
    """The ptxas log parsing sees the spills of a kernel squeezed into 16 registers."""
    unit = _unit(compiled, "spill_probe")
    assert unit["ok"], _describe(unit)
    info = parse_ptxas_log(unit["log"]).get("probe_spill")
    assert info is not None, _describe(unit)
    assert spill_problem(info) is not None, (info, _describe(unit))
    assert info["spill_stores"] > 0, (info, _describe(unit))


@pytest.mark.parametrize("label,where", [("broken", "end"), ("broken_first", "first")])
def test_broken_source_fails_with_the_file_name(compiled, label, where):
    """A syntax error fails the compile, reported at FILE(LINE) of the file it is in.

    At the end of the source: ``hooks.cu``; at the end of the first part:
    ``nesterov_ag.cu`` (the ``#line`` directive of each part maps the lines).
    """
    unit = _unit(compiled, label)
    assert not unit["ok"], "a broken source compiled: %s" % _describe(unit)
    assert "COMPILATION" in (unit["error"] or ""), unit["error"]
    _, path, line = _broken_source(where)
    where = '%s(%d): error' % (path.replace("\\", "/"), line)
    assert where in unit["log"], "expected %r in the log:\n%s" % (where, unit["log"])
    assert "cynag_broken_on_purpose" in unit["log"]
    errors = [l for l in unit["log"].splitlines() if ": error" in l]
    assert errors and not any(PROGRAM_NAME in l for l in errors), unit["log"]
