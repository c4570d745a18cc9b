"""OpenBLAS for MLX's Linux CPU backend (issue 8).

MLX's Linux CPU wheel links a bundled *reference* BLAS (``mlx_cpu.libs/libblas-*.so``,
2.5-5 GFLOP/s).  ``libmlx.so`` calls the standard CBLAS/LAPACK symbols (``cblas_sgemm``,
``sgetrf_``...), so a library in the process's *global* symbol scope that defines them wins
over the bundled one: preloading OpenBLAS makes every matrix product use it.  The dynamic
loader reads ``LD_PRELOAD`` only when a process starts, so ``prepare_process`` re-executes
the launcher once with it set::

    slabserve serve ...   (pid P, no OpenBLAS in the global scope)
      decide() -> REEXEC: env LD_PRELOAD=<libopenblas> SLABSERVE_BLAS_REEXEC=P
      os.execve(same interpreter, same command line)
    slabserve serve ...   (still pid P, OpenBLAS serves cblas_sgemm) -> PRELOADED

A process that is not the slabserve launcher (pytest through a conftest, a library caller)
is never re-executed: if mlx is not imported yet, OpenBLAS is loaded into it with
``RTLD_GLOBAL`` instead, which puts it in the global scope ahead of libmlx's own
dependencies just the same; if mlx is already imported, it is only told how.

Invariants: at most one exec per process (the marker holds the pid, which exec keeps;
children have other pids and simply inherit LD_PRELOAD); nothing is done off Linux, for a
GPU build of MLX, or when opted out (``SLABSERVE_NO_OPENBLAS=1``); a missing library never
fails, it is logged once with how to install it.  What is *active* is read from the process
(``dladdr`` of the global ``cblas_sgemm``, else ``/proc/self/maps``), never from the env.
mlx is never imported here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from slabserve import env

log = logging.getLogger("slabserve.blas")

INSTALL_HINT = (
    "install OpenBLAS for much faster MLX matrix products: "
    "`apt-get install libopenblas0-pthread` (Debian/Ubuntu), `dnf install openblas` "
    "(Fedora), `pacman -S openblas` (Arch), or point SLABSERVE_OPENBLAS at libopenblas.so.0; "
    "SLABSERVE_NO_OPENBLAS=1 silences this"
)


class Backend(str, Enum):
    """Which MLX build is installed (decided from files, without importing mlx)."""

    CPU = "cpu"
    CUDA = "cuda"
    METAL = "metal"
    NONE = "none"


class Reason(str, Enum):
    """What the launcher does (REEXEC, LOAD_GLOBAL) or why it does nothing; logged once."""

    REEXEC = "re-executing with OpenBLAS preloaded"
    LOAD_GLOBAL = "loading OpenBLAS RTLD_GLOBAL before mlx (not the launcher)"
    PRELOADED = "preloaded by the slabserve launcher"
    LOADED_GLOBAL = "loaded RTLD_GLOBAL before mlx was imported (not the launcher)"
    ALREADY_LOADED = "already in the process (LD_PRELOAD set outside slabserve)"
    OTHER_BLAS = "another BLAS already serves cblas_sgemm; left as is"
    NOT_LINUX = "not Linux: MLX uses Accelerate/Metal"
    GPU_BACKEND = "MLX's GPU build: matrix products run on the GPU"
    NO_MLX = "mlx is not installed"
    DISABLED = "disabled by SLABSERVE_NO_OPENBLAS"
    PRELOAD_IGNORED = "LD_PRELOAD did not take effect (wrong architecture?)"
    NOT_FOUND = "OpenBLAS not found; MLX uses its bundled reference BLAS (slow)"
    NOT_LAUNCHER = "not the slabserve launcher and mlx already imported: not switched"


_WARN = {Reason.PRELOAD_IGNORED, Reason.NOT_FOUND}


@dataclass(frozen=True)
class Decision:
    reason: Reason
    library: str | None = None  # the library to preload (REEXEC) or the one serving

    @property
    def reexec(self) -> bool:
        return self.reason is Reason.REEXEC


# ---- finding the library -----------------------------------------------------------------
def _triplets() -> list[str]:
    out = [sysconfig.get_config_var("MULTIARCH") or "", f"{platform.machine()}-linux-gnu"]
    if platform.machine() in ("armv7l", "armv8l"):
        out.append("arm-linux-gnueabihf")
    return list(dict.fromkeys(t for t in out if t))


def candidate_paths(triplets: Iterable[str] | None = None) -> list[str]:
    """Where distributions put OpenBLAS, best first: Debian/Ubuntu multiarch (the
    alternatives-selected ``libopenblas.so.0``, then the pthread/openmp/serial variants),
    Fedora/RHEL/SUSE ``lib64`` (pthread ``libopenblasp`` first), Arch/Alpine, source
    installs.  Never the ILP64 ``libopenblas64`` (its symbols carry a suffix)."""
    paths: list[str] = []
    for t in _triplets() if triplets is None else triplets:
        for root in (f"/usr/lib/{t}", f"/lib/{t}"):
            paths.append(f"{root}/libopenblas.so.0")
            for variant in ("openblas-pthread", "openblas-openmp", "openblas-serial"):
                paths += [f"{root}/{variant}/libopenblas.so.0", f"{root}/{variant}/libblas.so.3"]
    for root in ("/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/OpenBLAS/lib"):
        paths += [f"{root}/{name}.so.0" for name in ("libopenblasp", "libopenblas", "libopenblaso")]
    return list(dict.fromkeys(paths))


def _elf_id(path: str) -> tuple[int, int, int] | None:
    """(class, endianness, machine) from an ELF header, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], head[5], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _loadable(path: str) -> bool:
    """The file exists and is an ELF object for this interpreter's architecture."""
    ours = _elf_id(sys.executable)
    theirs = _elf_id(path)
    return theirs is not None and (ours is None or theirs == ours)


def find_openblas(
    candidates: Iterable[str] | None = None,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
    loadable: Callable[[str], bool] = _loadable,
    override: Path | None = None,
) -> str | None:
    """Path (or soname from ``find_library``) of an OpenBLAS to preload, or None.

    ``override`` (SLABSERVE_OPENBLAS) wins when loadable; else the first loadable
    ``candidates`` path; else ``find_library("openblasp"/"openblas")``."""
    if override is not None:
        return str(override) if loadable(str(override)) else None
    for path in candidate_paths() if candidates is None else candidates:
        if loadable(path):
            return path
    for name in ("openblasp", "openblas"):
        found = find_library(name)
        if found and "64" not in Path(found).name:
            return found
    return None


@functools.lru_cache(maxsize=1)
def openblas_path() -> str | None:
    """The library the launcher would preload here (SLABSERVE_OPENBLAS or the search)."""
    override = env.openblas_library()
    found = find_openblas(override=override)
    if override is not None and found is None:
        log.warning("SLABSERVE_OPENBLAS=%s is not a loadable library; ignored", override)
    return found


# ---- the installed MLX build, without importing it ---------------------------------------
def mlx_package_dir() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc)
        if (p / "lib").is_dir() or any(p.glob("core*.so")) or any(p.glob("core*.pyd")):
            return p
    return None


def mlx_backend(
    platform_name: str | None = None,
    find_package: Callable[[], Path | None] = mlx_package_dir,
) -> Backend:
    """CUDA when an ``mlx_cuda*`` distribution sits beside the mlx package, else CPU on
    Linux (the ``mlx[cpu]`` wheel, or a source build: preloading is harmless there)."""
    plat = sys.platform if platform_name is None else platform_name
    if plat == "darwin":
        return Backend.METAL
    pkg = find_package()
    if pkg is None:
        return Backend.NONE
    if any(pkg.parent.glob("mlx_cuda*.dist-info")):
        return Backend.CUDA
    return Backend.CPU


# ---- what the process actually uses ------------------------------------------------------
class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas_provider() -> str | None:
    """File of the library that defines ``cblas_sgemm`` in the global scope (the one
    libmlx's calls bind to, ahead of its bundled BLAS), or None when there is none.

    Falls back to ``/proc/self/maps`` (an OpenBLAS mapping) where dladdr is unusable."""
    try:
        proc = ctypes.CDLL(None)
        addr = ctypes.cast(proc.cblas_sgemm, ctypes.c_void_p)
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) (Windows)
        return None
    try:
        dladdr = proc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError):
        pass
    return next(iter(mapped_libraries("openblas")), None)


def mapped_libraries(fragment: str, maps: str | None = None) -> list[str]:
    """Distinct mapped files (from /proc/self/maps text) whose name contains ``fragment``."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    seen = (line.split(None, 5)[-1] for line in maps.splitlines() if line.count(" ") >= 5)
    return list(dict.fromkeys(p for p in seen if "/" in p and fragment in Path(p).name))


def classify(library: str | None) -> str:
    """'openblas', 'mkl', 'blis', 'reference' (a plain libblas) or 'other'."""
    if not library:
        return "reference"
    name = os.path.realpath(library).lower() + " " + library.lower()
    for kind in ("openblas", "mkl", "blis"):
        if kind in name:
            return kind
    return "reference" if "libblas" in name else "other"


# ---- the decision ------------------------------------------------------------------------
def decide(
    *, platform_name: str, backend: Backend, disabled: bool, reexeced_here: bool,
    provider: str | None, library: str | None, launcher: bool,
    loaded_here: bool = False, mlx_imported: bool = False,
) -> Decision:
    """Pure decision; the order is the precedence (facts about the process first)."""
    if platform_name != "linux":
        return Decision(Reason.NOT_LINUX)
    if backend is Backend.NONE:
        return Decision(Reason.NO_MLX)
    if backend is not Backend.CPU:
        return Decision(Reason.GPU_BACKEND)
    if provider is not None:
        if classify(provider) != "openblas":
            return Decision(Reason.OTHER_BLAS, provider)
        how = (Reason.PRELOADED if reexeced_here else
               Reason.LOADED_GLOBAL if loaded_here else Reason.ALREADY_LOADED)
        return Decision(how, provider)
    if disabled:
        return Decision(Reason.DISABLED)
    if reexeced_here:
        return Decision(Reason.PRELOAD_IGNORED, library)
    if library is None:
        return Decision(Reason.NOT_FOUND)
    if not launcher:
        return Decision(Reason.NOT_LAUNCHER if mlx_imported else Reason.LOAD_GLOBAL, library)
    return Decision(Reason.REEXEC, library)


def is_launcher() -> bool:
    """True when this process is the ``slabserve`` program (console script or
    ``python -m slabserve...``), so re-executing its command line re-runs slabserve."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name.split(".")[0] == "slabserve"
    return Path(sys.argv[0]).name in ("slabserve", "slabserve.exe") if sys.argv else False


def current_decision() -> Decision:
    return decide(
        platform_name=sys.platform,
        backend=mlx_backend(),
        disabled=env.openblas_disabled(),
        reexeced_here=env.blas_reexec_marker() == str(os.getpid()),
        provider=global_cblas_provider(),
        library=openblas_path(),
        launcher=is_launcher(),
        loaded_here=_loaded_here is not None,
        mlx_imported="mlx.core" in sys.modules,
    )


_logged: set[Reason] = set()
_loaded_here: str | None = None  # the library this module dlopen'ed RTLD_GLOBAL, if any


def load_global(library: str) -> None:
    """dlopen ``library`` into the global symbol scope (before mlx is imported)."""
    global _loaded_here
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    _loaded_here = library


def _log_once(d: Decision) -> None:
    if d.reason in _logged:
        return
    _logged.add(d.reason)
    if d.reason is Reason.NOT_FOUND:
        log.warning("BLAS: %s; %s", d.reason.value, INSTALL_HINT)
    elif d.reason is Reason.NOT_LAUNCHER:
        log.info("BLAS: %s; to use OpenBLAS run with LD_PRELOAD=%s", d.reason.value, d.library)
    else:
        log.log(logging.WARNING if d.reason in _WARN else logging.INFO,
                "BLAS: %s%s", d.reason.value, f" ({d.library})" if d.library else "")


def reexec_env(base: dict[str, str], library: str, pid: int) -> dict[str, str]:
    """``base`` with ``library`` first in LD_PRELOAD and the loop-guard marker set."""
    out = dict(base)
    prior = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p != library]
    out["LD_PRELOAD"] = " ".join([library, *prior])
    out[env.BLAS_REEXEC_MARKER] = str(pid)
    return out


def prepare_process(
    execve: Callable[..., object] = os.execve, load: Callable[[str], object] | None = None,
) -> Decision:
    """Call before mlx is imported.  Re-executes this process (``execve`` does not
    return) with OpenBLAS preloaded, or loads it RTLD_GLOBAL (``load``) when this is not
    the launcher, as ``current_decision()`` says; logs the outcome once and returns it."""
    d = current_decision()
    if d.reason is Reason.LOAD_GLOBAL and d.library:
        try:
            (load or load_global)(d.library)
        except OSError as e:
            log.warning("BLAS: could not load %s (%s); reference BLAS in use", d.library, e)
            return d
        d = current_decision()
    _log_once(d)
    if d.reexec and d.library:
        argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        execve(sys.executable, argv, reexec_env(dict(os.environ), d.library, os.getpid()))
    return d


def _openblas_details(library: str) -> tuple[str | None, int | None]:
    try:
        lib = ctypes.CDLL(library)  # already loaded: this returns the same handle
        lib.openblas_get_config.restype = ctypes.c_char_p
        return lib.openblas_get_config().decode(), int(lib.openblas_get_num_threads())
    except (OSError, AttributeError):
        return None, None


def status() -> dict:
    """What serves MLX's matrix products in this process, and why.

    Keys: ``blas`` ('openblas' | 'reference' | 'accelerate' | 'cublas' | 'mkl' | 'blis' |
    'other' | 'none'), ``library`` (path or None), ``reason`` (text), ``code`` (the
    Reason's name), ``backend``, and for OpenBLAS ``config`` and ``threads``."""
    d = current_decision()
    backend = mlx_backend()
    out: dict = {"backend": backend.value, "code": d.reason.name, "reason": d.reason.value,
                 "library": None, "config": None, "threads": None}
    if backend is Backend.METAL:
        return {**out, "blas": "accelerate"}
    if backend is Backend.CUDA:
        return {**out, "blas": "cublas"}
    if backend is Backend.NONE:
        return {**out, "blas": "none"}
    provider = global_cblas_provider()
    if provider is not None:
        kind = classify(provider)
        config, threads = _openblas_details(provider) if kind == "openblas" else (None, None)
        return {**out, "blas": kind, "library": provider, "config": config, "threads": threads}
    pkg = mlx_package_dir()
    bundled = mapped_libraries("libblas") or (
        sorted(str(p) for p in pkg.parent.glob("mlx_cpu.libs/libblas*.so*")) if pkg else [])
    return {**out, "blas": "reference", "library": bundled[0] if bundled else None}
