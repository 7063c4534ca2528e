"""What a CUDA build needs, found where users have it, as CMake flags.

* nvcc: on PATH, or under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda.
* cuBLAS (headers and libraries): in the CUDA toolkit, or PyPI's ``nvidia-cublas`` (CUDA 13;
  ``nvidia-cublas-cu12`` for CUDA 12) installed into the Python that runs the build. CMake's
  FindCUDAToolkit only looks in the toolkit, so a PyPI cuBLAS is handed to it by path; the
  binary then loads it from there (the build's RPATH), so keep that environment.
* libcuda, the driver's library: linked for CUDA's virtual memory management (VMM) pools. A
  machine with no driver and no toolkit stub (a build box without a GPU) builds without VMM.
* GPU architectures: those of the GPUs present (``nvidia-smi``), or a list given by the user.
  Real (SASS) code for exactly those GPUs compiles in a fraction of llama.cpp's default list.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import site
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from vision_cache.llama.server_build.errors import ToolMissing

log = logging.getLogger("vcache.build")

_ARCH = re.compile(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(-real|-virtual)?")
# where a toolkit is when nothing says otherwise, and where distributions put cuBLAS
_DEFAULT_ROOT = Path("/usr/local/cuda")
_SYSTEM_LIB_DIRS = tuple(
    Path(p)
    for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
)
_SYSTEM_INCLUDE_DIRS = (Path("/usr/include"),)
_CMAKE_ARCH_KEYWORDS = ("native", "all", "all-major")


@dataclasses.dataclass(frozen=True)
class Cublas:
    """A cuBLAS outside the toolkit: where its headers and libraries are."""

    include: Path
    lib: Path
    major: int


@dataclasses.dataclass(frozen=True)
class CudaSetup:
    nvcc: Path
    version: tuple[int, int]
    architectures: tuple[str, ...]
    cublas: Cublas | None  # None: the toolkit has it, where CMake looks by itself
    driver: Path | None  # libcuda to link when CMake would not find it; see `vmm`
    vmm: bool

    def cmake_flags(self) -> tuple[str, ...]:
        flags = ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(self.architectures)}"]
        if shutil.which("nvcc") is None:
            flags.append(f"-DCMAKE_CUDA_COMPILER={self.nvcc}")
        if not self.vmm:
            flags.append("-DGGML_CUDA_NO_VMM=ON")
        elif self.driver is not None:
            flags.append(f"-DCUDA_cuda_driver_LIBRARY={self.driver}")
        if self.cublas is not None:
            n = self.cublas.major
            flags += [
                f"-DCUDA_cublas_LIBRARY={self.cublas.lib / f'libcublas.so.{n}'}",
                f"-DCUDA_cublasLt_LIBRARY={self.cublas.lib / f'libcublasLt.so.{n}'}",
                f"-DCMAKE_CUDA_FLAGS=-I{self.cublas.include}",
            ]
        return tuple(flags)


def cuda_setup(architectures: tuple[str, ...] | None) -> CudaSetup:
    """Everything a CUDA build needs, or ToolMissing saying what is not there."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise ToolMissing(
            "the CUDA build needs nvcc, the CUDA toolkit's compiler: not on PATH, nor under "
            "$CUDA_HOME or /usr/local/cuda. Install the CUDA toolkit (NVIDIA's packages, e.g. "
            "cuda-toolkit-13-0, or Debian's nvidia-cuda-toolkit), or build for the CPU with --cpu"
        )
    version, roots = nvcc_facts(nvcc)
    archs = architectures or local_architectures()
    if not archs:
        raise ToolMissing(
            "no NVIDIA GPU found to compile for: pass --cuda-arch with its compute capability "
            "(e.g. 89 for RTX 40xx, 86 for RTX 30xx, 90 for H100/H200, 120 for RTX 50xx)"
        )
    in_toolkit = toolkit_has_cublas(roots)
    cublas = None if in_toolkit else find_pypi_cublas(version[0], site_dirs())
    if cublas is None and not in_toolkit:
        raise ToolMissing(missing_cublas_message(version, roots))
    driver, vmm = driver_library(roots)
    if not vmm:
        log.info(
            "no libcuda (the NVIDIA driver's library) here: building without CUDA virtual "
            "memory management (GGML_CUDA_NO_VMM); build on the GPU machine to have it"
        )
    return CudaSetup(nvcc, version, archs, cublas, driver, vmm)


def find_nvcc() -> Path | None:
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    if os.environ.get("CUDACXX") and Path(os.environ["CUDACXX"]).is_file():
        return Path(os.environ["CUDACXX"])
    for root in _env_roots():
        if (root / "bin" / "nvcc").is_file():
            return root / "bin" / "nvcc"
    return None


def _env_roots() -> Iterator[Path]:
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT"):
        if os.environ.get(var):
            yield Path(os.environ[var])
    yield _DEFAULT_ROOT


def nvcc_facts(nvcc: Path) -> tuple[tuple[int, int], tuple[Path, ...]]:
    """nvcc's CUDA version, and the toolkit directories it uses (its own root first)."""
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise ToolMissing(f"{nvcc} does not run: {(out.stderr or out.stdout).strip()[-300:]}")
    # nvcc may be a wrapper script; its dry run names the real toolkit directory (TOP)
    dry = subprocess.run(
        [str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    top = re.search(r"^#\$ TOP=(.+)$", dry.stderr, re.MULTILINE)
    roots = [Path(top.group(1)).resolve()] if top else []
    roots += [nvcc.resolve().parent.parent, *_env_roots()]
    return (int(m.group(1)), int(m.group(2))), tuple(dict.fromkeys(roots))


def _lib_dirs(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        yield root / "lib64"
        yield root / "lib"
        yield from sorted(root.glob("targets/*/lib"))
    # distribution packages (Debian's nvidia-cuda-toolkit) put it with the system's libraries
    yield from _SYSTEM_LIB_DIRS


def _include_dirs(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        yield root / "include"
        yield from sorted(root.glob("targets/*/include"))
    yield from _SYSTEM_INCLUDE_DIRS


def toolkit_has_cublas(roots: tuple[Path, ...]) -> bool:
    lib = any((d / "libcublas.so").exists() for d in _lib_dirs(roots))
    header = any((d / "cublas_v2.h").exists() for d in _include_dirs(roots))
    return lib and header


def site_dirs() -> list[Path]:
    """Where pip puts packages for this Python (venv, user, system, and $PYTHONPATH for
    ``pip install --target``)."""
    extra = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    dirs = [*site.getsitepackages(), site.getusersitepackages(), *extra]
    return [Path(d) for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]


def find_pypi_cublas(major: int, dirs: Iterable[Path]) -> Cublas | None:
    """PyPI's cuBLAS for CUDA `major`: ``nvidia/cu13/`` (nvidia-cublas 13.x) or
    ``nvidia/cublas/`` (nvidia-cublas-cu12)."""
    for d in dirs:
        for pkg in (d / "nvidia" / f"cu{major}", d / "nvidia" / "cublas"):
            lib, include = pkg / "lib", pkg / "include"
            if (
                (lib / f"libcublas.so.{major}").exists()
                and (lib / f"libcublasLt.so.{major}").exists()
                and (include / "cublas_v2.h").exists()
            ):
                return Cublas(include, lib, major)
    return None


def missing_cublas_message(version: tuple[int, int], roots: tuple[Path, ...]) -> str:
    major = version[0]
    pypi = "nvidia-cublas-cu12" if major == 12 else f"nvidia-cublas>={major},<{major + 1}"
    return (
        f"the CUDA build needs cuBLAS for CUDA {major}: it is not in the CUDA toolkit "
        f"({roots[0]}), nor installed from PyPI into this Python ({sys.executable}). "
        f"Install either: {sys.executable} -m pip install '{pypi}' (no root needed), or the "
        f"toolkit's cuBLAS development package (NVIDIA's libcublas-dev-{major}-{version[1]})"
    )


def driver_library(roots: tuple[Path, ...]) -> tuple[Path | None, bool]:
    """(libcuda to hand CMake, VMM on).

    VMM only where the driver is installed: a binary linked to libcuda does not start without
    it, and the build's smoke test runs the binary here. CMake finds a toolkit stub or a
    libcuda.so by itself; a driver installed without that link is handed to it by path.
    """
    driver = _ldconfig_lookup("libcuda.so.1")
    if driver is None:
        return None, False
    lib_dirs = list(_lib_dirs(roots))
    if any((d / "libcuda.so").exists() for d in [*lib_dirs, *(d / "stubs" for d in lib_dirs)]):
        return None, True
    return driver, True


def _ldconfig_lookup(soname: str) -> Path | None:
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if shutil.which(ldconfig) is None and not Path(ldconfig).exists():
            continue
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines():
            name, _, path = line.strip().partition(" => ")
            if name.split(" ", 1)[0] == soname and Path(path).exists():
                return Path(path)
        break
    return None


# --- the GPUs -------------------------------------------------------------------------------


def gpu_present() -> bool:
    """An NVIDIA GPU on this machine: a device node, or one that nvidia-smi lists."""
    return bool(list(Path("/dev").glob("nvidia[0-9]*"))) or bool(_nvidia_smi("name"))


def local_architectures() -> tuple[str, ...]:
    """The compute capabilities of the GPUs present, as CMake architectures (``89-real``)."""
    caps = _nvidia_smi("compute_cap")
    return parse_architectures(",".join(caps)) if caps else ()


def _nvidia_smi(field: str) -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0
        else []
    )


def parse_architectures(text: str) -> tuple[str, ...]:
    """``89``, ``8.9``, ``sm_89``, ``90a``, ``86-virtual`` (comma separated) -> CMake's form.

    A bare number means real code for that GPU generation only (``89-real``); add ``-virtual``
    for PTX that newer GPUs can compile at load time. ``native``/``all``/``all-major`` are
    passed to CMake as they are.
    """
    out = []
    for item in (s for s in re.split(r"[,;\s]+", text.strip()) if s):
        if item in _CMAKE_ARCH_KEYWORDS:
            out.append(item)
            continue
        m = _ARCH.fullmatch(item)
        if not m:
            raise ValueError(f"not a CUDA architecture: {item!r} (e.g. 89, 8.9, sm_89, 90a)")
        number = m.group(1) + (m.group(2) or "")
        out.append(f"{number}{m.group(3)}{m.group(4) or '-real'}")
    if not out:
        raise ValueError("no CUDA architecture given")
    return tuple(dict.fromkeys(out))
