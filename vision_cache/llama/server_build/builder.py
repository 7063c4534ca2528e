"""The build itself: plan, then copy the source, patch, configure, compile, install, check.

Each build lives in ``<cache>/<variant>-<key>/``: ``bin/`` (llama-server and its shared
libraries, found through ``$ORIGIN``), ``build.json`` (what went in; written last, so a build
without it is unfinished and is redone) and ``build.log``. The source copy is deleted once the
binary is installed; ccache (``<cache>/ccache``) keeps the compiled objects, so a rebuild, or
the other variant, compiles only what changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision_cache.llama.server_build import compat
from vision_cache.llama.server_build.cuda import CudaSetup, cuda_setup, gpu_present
from vision_cache.llama.server_build.equivalence import EquivalenceResult, check_equivalence
from vision_cache.llama.server_build.errors import (
    CompileError,
    PatchError,
    SmokeTestError,
    ToolMissing,
)
from vision_cache.llama.server_build.locks import file_lock
from vision_cache.llama.server_build.patches import (
    PatchSet,
    apply_patches,
    patch_set,
    read_verified_projectors,
    select_patch_series,
    write_generated,
)
from vision_cache.llama.server_build.plan import (
    BASE_CMAKE_FLAGS,
    BuildPlan,
    BuildRequest,
    default_cache_dir,
)
from vision_cache.llama.server_build.source import Source, resolve_source
from vision_cache.llama.server_build.toolchain import check_toolchain
from vision_cache.llama.server_build.ui import UiAssets, ui_assets

log = logging.getLogger("vcache.build")


def build_server(request: BuildRequest | None = None) -> Path:
    """The llama-server binary `request` asks for, built unless the cache has it.

    The patched server from a checkout of the user's own (``source``) is checked first: inside
    the proven range it is built as usual; outside it, it is built and must pass the tiny
    equivalence check, or the server is built without the patches (vcache then forwards raw
    images to it). Either way the log says which happened and why.
    """
    request = request or BuildRequest()
    cuda = cuda_for(request)
    cache = (request.cache_dir or default_cache_dir()).expanduser().resolve()
    source = resolve_source(request.source, cache)
    flags = (*BASE_CMAKE_FLAGS, *(cuda.cmake_flags() if cuda else ()), *request.cmake_args)
    details = _cuda_manifest(cuda)
    ui = ui_assets(source.tree, cache, request.ui)
    if request.variant == "stock":
        return ensure_built(
            BuildPlan("stock", source, PatchSet(), flags, cache, ui), request.jobs, details
        )
    if request.source is None and request.patch_dir is None:
        plan = BuildPlan("patched", source, patch_set(), flags, cache, ui)
        return ensure_built(plan, request.jobs, details)
    return _build_checked(request, source, flags, cache, details, ui)


def _build_checked(
    request: BuildRequest,
    source: Source,
    flags: tuple[str, ...],
    cache: Path,
    details: dict[str, Any],
    ui: UiAssets | None,
) -> Path:
    """The patched server for a tree the patches may not be proven on (see build_server)."""
    inside = compat.verdict(source, request.patch_dir)
    where = "inside" if inside.inside else "outside"
    log.info("%s is %s the proven range: %s", source.description, where, inside.why)
    try:
        label, series = select_patch_series(source.tree, request.patch_dir)
    except PatchError as e:
        if inside.inside:
            raise PatchError(f"{source.description} is inside the proven range, but {e}") from e
        return _without_patches(source, flags, cache, request.jobs, details, str(e), ui)
    log.info("patch series %r applies to this tree", label)
    plan = BuildPlan("patched", source, series, flags, cache, ui)
    if inside.inside:
        return ensure_built(plan, request.jobs, {**details, "series": label})
    try:
        binary = ensure_built(plan, request.jobs, {**details, "series": label})
    except (CompileError, SmokeTestError) as e:
        why = f"the patched build failed: {str(e).splitlines()[0]}"
        return _without_patches(source, flags, cache, request.jobs, details, why, ui)
    result = _equivalence(plan, binary, cache)
    if result.passed:
        log.info("packages on: the tiny equivalence check passed on this build: %s", result.detail)
        return binary
    why = f"the tiny equivalence check failed on the patched build: {result.detail}"
    return _without_patches(source, flags, cache, request.jobs, details, why, ui)


def _without_patches(
    source: Source,
    flags: tuple[str, ...],
    cache: Path,
    jobs: int,
    details: dict[str, Any],
    why: str,
    ui: UiAssets | None,
) -> Path:
    log.warning(
        "packages off: building llama-server WITHOUT vcache's patches, because %s. "
        "vcache forwards raw images to this server (no package is ever sent to it).",
        why,
    )
    plan = BuildPlan("stock", source, PatchSet(), flags, cache, ui)
    return ensure_built(plan, jobs, {**details, "packages_off_because": why})


def _equivalence(plan: BuildPlan, binary: Path, cache: Path) -> EquivalenceResult:
    """The check's verdict on this build, run once and remembered beside it."""
    record = plan.dir / "equivalence.json"
    if record.exists():
        data = json.loads(record.read_text())
        log.info("tiny equivalence check: remembered from %s", data.get("checked_at"))
        return EquivalenceResult(bool(data["passed"]), str(data["detail"]))
    log.info("running the tiny equivalence check on this build (seconds)")
    try:
        result = check_equivalence(binary, cache / "models")
    except ImportError as e:  # the model generator's gguf (a development dependency) is missing
        # not remembered: once the module is installed, the next build runs the check
        return EquivalenceResult(
            False, f"the check cannot run here ({e}): `pip install gguf`, then build again"
        )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.write_text(json.dumps({**dataclasses.asdict(result), "checked_at": stamp}) + "\n")
    return result


def cuda_for(request: BuildRequest) -> CudaSetup | None:
    """The CUDA setup, None for a CPU build. Auto: CUDA when an NVIDIA GPU is present, and
    the CPU (with a warning) when the machine cannot build for it."""
    if request.backend == "cpu":
        return None
    if request.backend == "cuda":
        return cuda_setup(request.cuda_architectures)
    if not gpu_present():
        log.info("no NVIDIA GPU found: building for the CPU (--cuda to build for CUDA anyway)")
        return None
    try:
        setup = cuda_setup(request.cuda_architectures)
    except ToolMissing as e:
        log.warning(
            "an NVIDIA GPU is present but this machine cannot build for CUDA, so this "
            "build is for the CPU: %s",
            e,
        )
        return None
    log.info(
        "NVIDIA GPU found: building for CUDA (%s); --cpu to build for the CPU",
        ";".join(setup.architectures),
    )
    return setup


def _cuda_manifest(cuda: CudaSetup | None) -> dict[str, Any]:
    if cuda is None:
        return {"backend": "cpu"}
    return {
        "backend": "cuda",
        "cuda": {
            "nvcc_version": ".".join(map(str, cuda.version)),
            "architectures": list(cuda.architectures),
            "cublas": str(cuda.cublas.lib) if cuda.cublas else "toolkit",
            "vmm": cuda.vmm,
        },
    }


def ensure_built(plan: BuildPlan, jobs: int, details: dict[str, Any] | None = None) -> Path:
    """Build `plan` unless it is built; two processes asking at once build it once."""
    if _finished(plan):
        log.info("%s: up to date (%s)", plan.variant, plan.binary)
        return plan.binary
    with file_lock(plan.cache / f"{plan.dir.name}.lock"):
        if _finished(plan):
            log.info("%s: built by another process (%s)", plan.variant, plan.binary)
            return plan.binary
        check_toolchain()
        started = time.monotonic()
        plan.dir.mkdir(parents=True, exist_ok=True)
        tree = prepare_tree(plan)
        compile_tree(plan, tree, jobs)
        install(plan, tree, details or {})
    log.info("%s: built in %.0f s -> %s", plan.variant, time.monotonic() - started, plan.binary)
    return plan.binary


def _finished(plan: BuildPlan) -> bool:
    return plan.manifest.exists() and plan.binary.exists()


def _skip_vcs_and_builds(directory: str, names: list[str]) -> set[str]:
    """Leave out .git and build directories (not files such as build-info.cpp.in)."""
    return {
        n
        for n in names
        if n == ".git" or ((n == "build" or n.startswith("build-")) and Path(directory, n).is_dir())
    }


def prepare_tree(plan: BuildPlan) -> Path:
    """A private copy of the source (never the user's checkout), patched for `patched`."""
    tree = plan.dir / "src"
    if tree.exists():
        shutil.rmtree(tree)
    log.info("copying the source into %s", tree)
    shutil.copytree(plan.source.tree, tree, symlinks=True, ignore=_skip_vcs_and_builds)
    apply_patches(tree, plan.patches.patches)
    write_generated(tree, plan.patches)
    if plan.ui is not None:
        plan.ui.install(tree)
    return tree


def build_env(plan: BuildPlan) -> dict[str, str]:
    env = dict(os.environ)
    # the copy may live inside a git work tree: keep llama.cpp's build-info from reporting it
    env["GIT_CEILING_DIRECTORIES"] = str(plan.dir)
    # paths relative to the build's directory let ccache share objects between builds
    env.setdefault("CCACHE_BASEDIR", str(plan.dir))
    env.setdefault("CCACHE_DIR", str(plan.cache / "ccache"))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    return env


def compile_tree(plan: BuildPlan, tree: Path, jobs: int) -> None:
    build = tree / "build"
    logfile = plan.dir / "build.log"
    logfile.unlink(missing_ok=True)
    env = build_env(plan)
    flags = list(plan.cmake_flags)
    if plan.variant == "patched":
        flags.append(f"-DVCACHE_BUILD_ID={plan.variant}-{plan.key}")
    # make when there is one (the generator every build so far used, which keeps their ccache
    # objects reusable), else ninja
    generator = [] if shutil.which("make") else ["-G", "Ninja"]
    log.info("configuring %s (%s)", plan.variant, plan.source.description)
    run_logged(["cmake", "-S", str(tree), "-B", str(build), *generator, *flags], logfile, env)
    relocatable_unity_sources(build, tree)
    log.info("compiling %s llama-server with %d jobs (log: %s)", plan.variant, jobs, logfile)
    run_logged(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], logfile, env
    )


def relocatable_unity_sources(build: Path, tree: Path) -> None:
    """Make CMake's unity sources include their files by relative path.

    libllama's model sources compile as unity batches (UNITY_BUILD ON in llama.cpp); CMake
    (before 3.32) writes each batch as ``#include "<absolute path>"`` lines, so the batch's text
    differs in every build directory and ccache, which hashes it, never reuses those objects
    (about two minutes of the build on two cores, for every variant and every cache).
    """
    prefix = f'#include "{tree}/'
    for unity in build.glob("**/Unity/unity_*"):
        text = unity.read_text()
        if prefix in text:
            relative = os.path.relpath(tree, unity.parent)
            unity.write_text(text.replace(prefix, f'#include "{relative}/'))


def run_logged(cmd: Sequence[str], logfile: Path, env: dict[str, str]) -> None:
    """Run a build command, its output in logfile, a progress line every ~10%."""
    last = -10
    with logfile.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # `with`: the pipe is closed when the command ends, not when the GC gets to it
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                m = re.match(r"\[\s*(\d+)%\]|\[(\d+)/(\d+)\]", line)
                percent = _percent(m) if m else None
                if percent is not None and percent >= last + 10:
                    last = percent
                    log.info("  %3d%% %s", percent, line.split("]", 1)[1].strip()[:90])
        if proc.returncode != 0:
            out.flush()
            tail = logfile.read_text(errors="replace").splitlines()[-30:]
            raise CompileError(
                f"command failed: {' '.join(cmd)}\n" + "\n".join(tail) + f"\n(full log: {logfile})"
            )


def _percent(m: re.Match[str]) -> int:
    """make prints ``[ 42%]``, ninja ``[120/300]``."""
    if m.group(1):
        return int(m.group(1))
    return int(m.group(2)) * 100 // max(1, int(m.group(3)))


def install(plan: BuildPlan, tree: Path, details: dict[str, Any]) -> None:
    """Keep bin/ (the binary and its shared libraries) and a manifest; drop the rest."""
    bindir = plan.dir / "bin"
    if bindir.exists():
        shutil.rmtree(bindir)
    shutil.copytree(tree / "build" / "bin", bindir, symlinks=True)
    smoke_test(bindir / "llama-server", patched=bool(plan.patches.patches))
    if plan.ui is not None:
        check_ui_embedded(tree / "build")
    manifest = {
        "variant": plan.variant,
        "key": plan.key,
        "source": plan.source.description,
        "source_digest": plan.source.digest,
        "llama_cpp_commit": plan.source.commit,
        "patches": [p.name for p in plan.patches.patches],
        "verified_projectors": read_verified_projectors(plan.patches),
        "cmake_flags": list(plan.cmake_flags),
        "ui": {"digest": plan.ui.digest, "from": plan.ui.origin} if plan.ui else None,
        **details,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = plan.manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(plan.manifest)
    shutil.rmtree(tree)


def check_ui_embedded(build: Path) -> None:
    """CMake says "pre-built assets" and still embeds none if it dislikes them: check."""
    header = build / "tools" / "ui" / "ui.h"
    if "#define LLAMA_UI_HAS_ASSETS 1" not in header.read_text(errors="replace"):
        raise SmokeTestError(f"the web UI was not embedded ({header} has no assets)")


def smoke_test(binary: Path, patched: bool) -> None:
    """The installed binary must start (it finds its libraries) and be the right variant."""
    res = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SmokeTestError(f"{binary} does not run: {(res.stderr or res.stdout).strip()[-500:]}")
    if patched != ("--image-embedding-dir" in res.stdout):
        state = "lacks" if patched else "has"
        raise SmokeTestError(f"{binary} {state} the patches' --image-embedding-dir flag")
