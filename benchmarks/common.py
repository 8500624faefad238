"""What every benchmark records next to its numbers, and how rows are appended.

Every row carries the same provenance fields: bench name, device (and its type), torch /
triton / CUDA versions, git commit (with a dirty flag) and UTC date. Kernel benchmarks record
GPU runs only; a benchmark of the CPU path (merge, training) says ``device_type: cpu`` and
names the CPU. ``PeakMemory`` measures a block's peak extra memory on either device.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def git_commit() -> tuple[str, bool]:
    """(HEAD sha or "uncommitted", whether tracked files differ from it).

    ``SPARSE_ENGINE_COMMIT`` (a sha, set by whoever copies a clean tree without its ``.git``
    to another machine, e.g. the GPU machine) is taken as the commit of a clean tree.
    """
    given = os.environ.get("SPARSE_ENGINE_COMMIT")
    if given:
        return given, False
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return head, dirty
    except Exception:  # noqa: BLE001 - no git, or no commit yet
        return "uncommitted", True


def device_name(device="cuda") -> str:
    """The CUDA device's name, or ``cpu (<model name>, <n> threads)`` for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux: keep platform's answer
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def run_metadata(bench: str, device="cuda", **extra) -> dict:
    """Provenance of a benchmark run on ``device`` (default: the current CUDA device).

    On the CPU ``triton`` is its version if installed (else None) and ``cuda`` is the CUDA
    version torch was built with (None for the CPU build).
    """
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    head, dirty = git_commit()
    return dict(
        bench=bench,
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        commit=head,
        dirty=dirty,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


class PeakMemory:
    """Peak extra memory of a block (``.peak``, bytes): CUDA allocator stats (max allocated
    minus allocated before), or on the CPU the process's peak RSS (reset through
    ``/proc/self/clear_refs``) minus the RSS before; ``.peak`` is None where neither works.
    On the CPU call ``reexec_with_fixed_mmap_threshold`` first, or freed memory is not seen."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.peak = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self):
        import torch

        gc.collect()
        self.before = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS
                    f.write("5")
                self.before = self._status("VmRSS")
            except (OSError, RuntimeError):  # not Linux, or not allowed: no CPU figure
                pass
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.before is not None:
            self.peak = max(0, self._status("VmHWM") - self.before)  # RSS can fall between reset and read
        return False


MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
FIXED_MMAP_THRESHOLD = "131072"  # 128 KiB: glibc's default before it starts raising it


def reexec_with_fixed_mmap_threshold(script: str) -> None:
    """CPU peak RSS is only meaningful if freed tensors leave the process: glibc raises its
    mmap threshold dynamically (up to 32 MB) and then serves big tensors from the heap, whose
    freed pages stay resident and get reused unseen. A fixed threshold (set before start)
    keeps every tensor above 128 KiB in its own mapping, returned to the OS when freed.
    Re-executes ``script`` with the same arguments (once; a no-op where already set).

    Timings taken in such a process are not a user's: every mid-size temporary is a fresh
    mapping whose pages fault in (measured: 4x the CPU serving path's cost). Benchmarks that
    time and measure memory run the memory rows in a child: :func:`run_with_fixed_mmap_threshold`."""
    if mmap_threshold() is None and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], _fixed_threshold_env())


def _fixed_threshold_env() -> dict:
    return dict(os.environ, **{MMAP_THRESHOLD_ENV: FIXED_MMAP_THRESHOLD})


def mmap_threshold() -> str | None:
    """This process's fixed glibc mmap threshold (recorded in rows), or None: glibc's default."""
    return os.environ.get(MMAP_THRESHOLD_ENV)


def run_with_fixed_mmap_threshold(script: str, argv: list[str], timeout: float = 3600) -> int:
    """Run ``script argv`` in a child process with the fixed mmap threshold (its peak-memory
    rows), this process keeping glibc's default for its timings; the child's exit status."""
    import subprocess

    try:
        return subprocess.run([sys.executable, os.path.abspath(script), *argv], env=_fixed_threshold_env(),
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"{os.path.basename(script)}: the peak-memory child ran past {timeout:.0f} s", file=sys.stderr)
        return 1


def append_rows(path: str, rows: list[dict], *, quiet: bool = False) -> None:
    """Append JSON lines to ``path`` (created with its folder if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if not quiet:
        print(f"appended {len(rows)} rows to {path}")


def sm90_compile_check(jobs, divisible16=()) -> int:
    """Compile Triton kernels for sm_90 with the installed Triton (no GPU needed) and print
    each one's resources (registers, spill stack, shared memory, tensor-core / async-copy
    instruction counts when the CUDA tools shipped with Triton are present).

    ``jobs``: ``(label, kernel, arg types, constexprs, autotune config)``. Pointer arguments,
    ``stride*`` arguments and the names in ``divisible16`` are hinted as multiples of 16, as
    the JIT would specialise them on the benchmark shapes. Returns 1 if any compile failed.
    """
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    try:
        import triton.backends.nvidia as nv

        tools = os.path.join(os.path.dirname(nv.__file__), "bin")
    except ImportError:
        tools = None
    target = GPUTarget("cuda", 90, 32)

    def compile_one(kernel, types, consts, cfg):
        fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # a JITFunction, or an Autotuner around one
        consts = {**consts, **cfg.kwargs}
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in divisible16)}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})

    def describe(k):
        smem = k.metadata.shared
        if tools is None:
            return f"smem={smem}"
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
            path = f.name
        try:
            res = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                                 capture_output=True, text=True).stdout
            sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True,
                                  text=True).stdout
        finally:
            os.unlink(path)
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
        regs, stack = (m.group(1), m.group(2)) if m else ("?", "?")
        scalar = len(re.findall(r"LDG\.E\.(?:U16|S16|U8|S8)\b", sass))
        vector = len(re.findall(r"LDG\.E\.(?:64|128)\b", sass))
        return (f"regs={regs:>3s} stack={stack} smem={smem:>6d} HGMMA={sass.count('HGMMA'):>2d} "
                f"HMMA={sass.count('HMMA'):>2d} LDGSTS={sass.count('LDGSTS'):>3d} LDG={sass.count('LDG.E'):>3d} "
                f"vecLDG={vector:>3d} scalarLDG={scalar}")

    print(f"compile-check: triton {triton.__version__}, target sm_90; {len(jobs)} kernels")
    failures = 0
    for label, kernel, types, consts, cfg in jobs:
        try:
            k = compile_one(kernel, types, consts, cfg)
            print(f"{label:28s} w{cfg.num_warps} s{cfg.num_stages}  {describe(k)}")
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"{label:28s} w{cfg.num_warps} s{cfg.num_stages}  FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"compile-check: {failures} failures; nothing recorded")
    return 1 if failures else 0
