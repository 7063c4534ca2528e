"""`vcache build-server`: an installed vcache builds the patched llama-server by itself, and
says what is missing when it cannot (tools, nvcc, cuBLAS, a GPU to compile for)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.cli.main import main as vcache_main
from tests.support.proxy_process import ProxyProcess
from tests.support.vlm_client import chat, image_part
from vision_cache.llama.server_build import (
    BuildRequest,
    CompileError,
    SmokeTestError,
    SourceError,
    ToolMissing,
    build_server,
    builder,
    cuda,
    source,
    toolchain,
)
from vision_cache.llama.server_build.errors import PatchError
from vision_cache.llama.server_build.patches import (
    VERIFIED_INCLUDE,
    apply_patches,
    patch_set,
    read_verified_projectors,
    write_generated,
)
from vision_cache.llama.server_build.plan import BuildPlan
from vision_cache.llama.server_build.source import (
    LLAMA_CPP_PYTHON_VERSION,
    PINNED_COMMIT,
    SDIST_NAME,
    Source,
)
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import ModelFiles

ROOT = Path(__file__).resolve().parent.parent
REPO_CACHE = Path(os.environ.get("VCACHE_LLAMA_CACHE", ROOT / ".build" / "llama"))


# --- the acceptance test: pip install, build, serve -----------------------------------------


def _copy_checkout(dest: Path) -> Path:
    """This checkout as a fresh clone has it: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _fresh_env(tmp: Path) -> dict[str, str]:
    """No trace of this checkout's environment: the default cache under a new XDG cache home.

    Three things are reused so that the test does not spend minutes repeating `make llama`: the
    compiled objects (ccache), the downloaded llama.cpp sdist, and the built web UI (without
    it this build would differ from `make llama`'s, and none of ccache's objects would match)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VCACHE_LLAMA_CACHE", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env["XDG_CACHE_HOME"] = str(tmp / "cache")
    if (REPO_CACHE / "ccache").is_dir():
        env["CCACHE_DIR"] = str(REPO_CACHE / "ccache")
    for sdist in (REPO_CACHE / "downloads").glob("*.tar.gz"):
        downloads = tmp / "cache" / "vcache" / "llama" / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        os.link(sdist, downloads / sdist.name)
    if (REPO_CACHE / "ui").is_dir():
        shutil.copytree(
            REPO_CACHE / "ui", tmp / "cache" / "vcache" / "llama" / "ui", ignore=_ui_scratch
        )
    return env


def _ui_scratch(_dir: str, names: list[str]) -> set[str]:
    """A UI build in progress (or its lock) is not part of the cache to copy."""
    return {n for n in names if n.startswith(".build-") or n.endswith(".lock")}


@pytest.mark.server
@pytest.mark.slow
def test_pip_install_alone_builds_a_patched_server_that_serves_a_hit(
    tmp_path: Path, tiny_model: Callable[[str], ModelFiles]
) -> None:
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--no-compile",
            "--disable-pip-version-check",
            "-c",
            str(src / "constraints.txt"),
            str(src),
        ],
        cwd=tmp_path,
        check=True,
    )
    shutil.rmtree(src)  # from here on, only the installed package exists
    env = _fresh_env(tmp_path)
    vcache = str(venv / "bin" / "vcache")

    build = subprocess.run(
        [vcache, "build-server", "--cpu", "--jobs", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    binary = Path(build.stdout.strip())
    assert build.stdout.splitlines() == [str(binary)]  # the path alone, progress on stderr
    assert binary.is_relative_to(tmp_path / "cache" / "vcache" / "llama")
    manifest = json.loads((binary.parent.parent / "build.json").read_text())
    assert manifest["patches"] == [p.name for p in sorted((ROOT / "llama_patches").glob("*.patch"))]
    assert manifest["backend"] == "cpu"

    files = tiny_model("gemma3")
    url = sample_image("shapes_640x480").data_url()
    args = [
        "--llama-server",
        str(binary),
        "--store",
        str(tmp_path / "store"),
        "--",
        "-m",
        str(files.model),
        "--mmproj",
        str(files.mmproj),
        "-t",
        "2",
        "-c",
        "4096",
        "--no-warmup",
    ]
    with ProxyProcess(
        args, tmp_path / "serve.log", vcache=[vcache], env=env, startup_timeout=300
    ) as proxy:
        miss = chat(proxy.base_url, [image_part(url)], "What is in the picture?")
        hit = chat(proxy.base_url, [image_part(url)], "What is in the picture?")
    assert "misses=1" in miss.headers["x-vcache"]
    assert "hits=1" in hit.headers["x-vcache"]
    assert hit.timings["media_encoded_n"] == 0
    assert hit.tokens == miss.tokens


# --- the build's steps, on a stand-in llama.cpp ----------------------------------------------

# a CMake project laid out like llama.cpp, whose llama-server prints a usage line: the builder's
# steps (copy, configure, compile, install, smoke test, manifest) run for real in seconds
_FAKE_SERVER = '#include <stdio.h>\nint main(void) { puts("%s"); return 0; }\n'
_FAKE_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake_llama_cpp C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-server tools/server/server.c)
"""


def _fake_llama_cpp(root: Path, usage: str = "usage: llama-server [options]") -> Path:
    (root / "tools" / "server").mkdir(parents=True)
    (root / "tools" / "mtmd").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(_FAKE_CMAKE)
    (root / "tools" / "server" / "server.c").write_text(_FAKE_SERVER % usage)
    return root


def _stock(source: Path | None, cache: Path) -> BuildRequest:
    return BuildRequest(variant="stock", backend="cpu", source=source, jobs=1, cache_dir=cache)


def test_a_checkout_is_built_once_from_a_copy(tmp_path: Path) -> None:
    src = _fake_llama_cpp(tmp_path / "llama.cpp")
    request = _stock(src, tmp_path / "cache")
    binary = build_server(request)
    assert binary.is_file() and binary.is_relative_to(tmp_path / "cache")
    build = binary.parent.parent
    manifest = json.loads((build / "build.json").read_text())
    assert (manifest["variant"], manifest["backend"], manifest["patches"]) == ("stock", "cpu", [])
    assert "checkout" in manifest["source"] and "-DBUILD_SHARED_LIBS=ON" in manifest["cmake_flags"]
    assert not (build / "src").exists()  # the copy is dropped once installed
    assert sorted(p.name for p in src.iterdir()) == ["CMakeLists.txt", "tools"]  # untouched
    built_at = binary.stat().st_mtime_ns
    assert build_server(request) == binary and binary.stat().st_mtime_ns == built_at
    # another source is another build
    (src / "tools" / "server" / "server.c").write_text(_FAKE_SERVER % "usage: v2")
    assert build_server(request) != binary


def test_the_pinned_sdist_is_unpacked_once_and_built(tmp_path: Path) -> None:
    tree = _fake_llama_cpp(tmp_path / "tree")
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / SDIST_NAME, "w:gz") as tar:
        tar.add(tree, arcname=f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp")
    binary = build_server(_stock(None, cache))
    manifest = json.loads((binary.parent.parent / "build.json").read_text())
    assert manifest["llama_cpp_commit"] == PINNED_COMMIT
    assert LLAMA_CPP_PYTHON_VERSION in manifest["source"]
    assert [p.name for p in (cache / "sources").iterdir()] == [manifest["source_digest"][:16]]


def test_an_sdist_that_cannot_be_downloaded_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_fails(*args: object, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess([], 1)

    monkeypatch.setattr(subprocess, "run", pip_fails)  # pip, as if the index were unreachable
    with pytest.raises(SourceError, match=SDIST_NAME):
        source.fetch_sdist(tmp_path / "downloads")


def test_a_compile_error_shows_the_log(tmp_path: Path) -> None:
    src = _fake_llama_cpp(tmp_path / "llama.cpp")
    (src / "tools" / "server" / "server.c").write_text("int main( {\n")
    with pytest.raises(CompileError, match=r"build\.log") as failed:
        build_server(_stock(src, tmp_path / "cache"))
    assert "server.c" in str(failed.value)  # the compiler's own words, from the log's tail


def test_a_binary_of_the_other_variant_fails_the_smoke_test(tmp_path: Path) -> None:
    src = _fake_llama_cpp(tmp_path / "llama.cpp", usage="--image-embedding-dir DIR")
    with pytest.raises(SmokeTestError, match="image-embedding-dir"):
        build_server(_stock(src, tmp_path / "cache"))


# --- what a CUDA build needs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "cmake"),
    [
        ("89", ("89-real",)),
        ("8.9", ("89-real",)),
        ("sm_86,sm_89", ("86-real", "89-real")),
        ("90a", ("90a-real",)),
        ("120-virtual", ("120-virtual",)),
        ("86;86", ("86-real",)),
        ("native", ("native",)),
    ],
)
def test_architectures_take_the_usual_spellings(given: str, cmake: tuple[str, ...]) -> None:
    assert cuda.parse_architectures(given) == cmake


@pytest.mark.parametrize("given", ["", "ampere", "sm_", "8.9.1", "89-fat"])
def test_malformed_architectures_are_refused(given: str) -> None:
    with pytest.raises(ValueError, match="CUDA architecture"):
        cuda.parse_architectures(given)


@pytest.fixture
def fake_toolkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An nvcc 13.0 with a toolkit that has no cuBLAS, no driver, no GPU and no pip cuBLAS."""
    root = tmp_path / "cuda"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version) echo "Cuda compilation tools, release 13.0";;\n'
        f'*) echo "#$ TOP={root}/bin/.." >&2;; esac\n'
    )
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{root / 'bin'}:{os.environ['PATH']}")
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cuda, "_DEFAULT_ROOT", root)
    monkeypatch.setattr(cuda, "_SYSTEM_LIB_DIRS", ())
    monkeypatch.setattr(cuda, "_SYSTEM_INCLUDE_DIRS", ())
    monkeypatch.setattr(cuda, "site_dirs", lambda: [tmp_path / "site"])
    monkeypatch.setattr(cuda, "_ldconfig_lookup", lambda soname: None)
    monkeypatch.setattr(cuda, "_nvidia_smi", lambda field: [])
    return tmp_path


def _pip_cublas(site: Path, major: int = 13) -> Path:
    pkg = site / "nvidia" / f"cu{major}"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "include").mkdir()
    for name in (f"libcublas.so.{major}", f"libcublasLt.so.{major}"):
        (pkg / "lib" / name).touch()
    (pkg / "include" / "cublas_v2.h").touch()
    return pkg


def test_missing_cublas_names_the_package_to_install(fake_toolkit: Path) -> None:
    with pytest.raises(ToolMissing) as e:
        cuda.cuda_setup(("89-real",))
    assert "cuBLAS for CUDA 13" in str(e.value)
    assert "pip install 'nvidia-cublas>=13,<14'" in str(e.value)


def test_pip_cublas_is_handed_to_cmake_by_path(fake_toolkit: Path) -> None:
    pkg = _pip_cublas(fake_toolkit / "site")
    setup = cuda.cuda_setup(("89-real",))
    flags = setup.cmake_flags()
    assert "-DGGML_CUDA=ON" in flags
    assert "-DCMAKE_CUDA_ARCHITECTURES=89-real" in flags
    assert f"-DCUDA_cublas_LIBRARY={pkg / 'lib' / 'libcublas.so.13'}" in flags
    assert f"-DCUDA_cublasLt_LIBRARY={pkg / 'lib' / 'libcublasLt.so.13'}" in flags
    assert f"-DCMAKE_CUDA_FLAGS=-I{pkg / 'include'}" in flags
    # no driver here: a binary linked to libcuda would not start, so no VMM
    assert "-DGGML_CUDA_NO_VMM=ON" in flags


def test_a_cublas_for_another_cuda_version_does_not_count(fake_toolkit: Path) -> None:
    _pip_cublas(fake_toolkit / "site", major=12)
    with pytest.raises(ToolMissing, match="cuBLAS for CUDA 13"):
        cuda.cuda_setup(("89-real",))


def test_toolkit_cublas_needs_no_flags(fake_toolkit: Path) -> None:
    root = fake_toolkit / "cuda"
    (root / "lib64" / "libcublas.so").touch()
    (root / "include" / "cublas_v2.h").touch()
    flags = cuda.cuda_setup(("89-real",)).cmake_flags()
    assert not any("cublas" in f for f in flags)


def test_an_installed_driver_turns_vmm_on(
    fake_toolkit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pip_cublas(fake_toolkit / "site")
    driver = fake_toolkit / "libcuda.so.1"
    driver.touch()
    monkeypatch.setattr(cuda, "_ldconfig_lookup", lambda soname: driver)
    flags = cuda.cuda_setup(("89-real",)).cmake_flags()
    assert "-DGGML_CUDA_NO_VMM=ON" not in flags
    assert f"-DCUDA_cuda_driver_LIBRARY={driver}" in flags


def test_the_gpus_present_choose_the_architectures(
    fake_toolkit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pip_cublas(fake_toolkit / "site")
    monkeypatch.setattr(cuda, "_nvidia_smi", lambda field: ["8.9", "8.6", "8.9"])
    assert cuda.cuda_setup(None).architectures == ("89-real", "86-real")


def test_no_gpu_and_no_architecture_says_to_pass_one(fake_toolkit: Path) -> None:
    _pip_cublas(fake_toolkit / "site")
    with pytest.raises(ToolMissing, match="--cuda-arch"):
        cuda.cuda_setup(None)


def test_the_command_reports_a_missing_cublas_on_stderr_only(
    fake_toolkit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = vcache_main(
        ["build-server", "--cuda-arch", "89", "--cache-dir", str(fake_toolkit / "cache")]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert "vcache build-server: error:" in err
    assert "nvidia-cublas" in err


def test_cuda_architectures_and_cpu_contradict(capsys: pytest.CaptureFixture[str]) -> None:
    assert vcache_main(["build-server", "--cpu", "--cuda-arch", "89"]) == 2
    assert "contradict" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("gpu", "setup_fails", "backend"),
    [(False, False, "cpu"), (True, False, "cuda"), (True, True, "cpu")],
)
def test_auto_builds_for_cuda_when_a_gpu_is_present_and_cuda_can_be_built(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    gpu: bool,
    setup_fails: bool,
    backend: str,
) -> None:
    fake = cuda.CudaSetup(Path("nvcc"), (13, 0), ("89-real",), None, None, False)

    def setup(archs: tuple[str, ...] | None) -> cuda.CudaSetup:
        if setup_fails:
            raise ToolMissing("no nvcc")
        return fake

    monkeypatch.setattr(builder, "gpu_present", lambda: gpu)
    monkeypatch.setattr(builder, "cuda_setup", setup)
    with caplog.at_level(logging.INFO, logger="vcache.build"):
        chosen = builder.cuda_for(BuildRequest())
    assert (chosen is fake) == (backend == "cuda")
    if setup_fails:
        assert "no nvcc" in caplog.text and "for the CPU" in caplog.text


# --- tools and patches ----------------------------------------------------------------------


def test_missing_tools_are_named_with_the_packages_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ToolMissing) as e:
        toolchain.check_toolchain()
    message = str(e.value)
    for what in ("cmake", "a C++ compiler", "a C compiler", "make or ninja", "git"):
        assert what in message
    assert "sudo apt-get install cmake g++ gcc make git" in message
    assert "sudo dnf install cmake gcc-c++ gcc make git" in message


def _plan(patches_dir: Path) -> BuildPlan:
    source = Source(Path("/nonexistent"), "digest", "test", "0000000")
    return BuildPlan("patched", source, patch_set(patches_dir), ("-DX=1",), Path("/cache"))


def test_every_patch_input_but_the_readme_is_in_the_build_key(tmp_path: Path) -> None:
    (tmp_path / "0001-a.patch").write_text("diff\n")
    (tmp_path / "verified.txt").write_text("gemma3\n")
    (tmp_path / "README.md").write_text("docs\n")
    ps = patch_set(tmp_path)
    assert [p.name for p in ps.patches] == ["0001-a.patch"]
    assert [p.name for p in ps.inputs] == ["0001-a.patch", "verified.txt"]
    key = _plan(tmp_path).key
    (tmp_path / "README.md").write_text("other docs\n")
    assert _plan(tmp_path).key == key
    (tmp_path / "verified.txt").write_text("gemma3\nqwen2vl_merger\n")
    assert _plan(tmp_path).key != key


def test_the_shipped_patches_are_found() -> None:
    names = [p.name for p in patch_set().patches]
    assert names == sorted(p.name for p in (ROOT / "llama_patches").glob("*.patch"))


PATCH = """\
diff --git a/a.txt b/a.txt
--- a/a.txt
+++ b/a.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
@@ -5,3 +5,3 @@
 five
-six
+SIX
 seven
"""


@pytest.mark.parametrize("tool", ["git", "patch"])
def test_a_patch_that_does_not_apply_names_its_file_and_hunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda cmd: None if cmd == "git" and tool == "patch" else which(cmd)
    )
    patch = tmp_path / "0001-a.patch"
    patch.write_text(PATCH)
    good, bad = tmp_path / "good", tmp_path / "bad"
    lines = ["one", "two", "three", "four", "five", "six", "seven"]
    for tree, text in ((good, lines), (bad, [*lines[:5], "changed", *lines[6:]])):
        tree.mkdir()
        (tree / "a.txt").write_text("\n".join(text) + "\n")
    apply_patches(good, [patch])
    assert (good / "a.txt").read_text().split() == [*lines[:1], "TWO", *lines[2:5], "SIX", lines[6]]
    with pytest.raises(PatchError, match=r"0001-a.patch does not apply .* hunk #2 in a.txt"):
        apply_patches(bad, [patch])


def test_the_verified_list_is_compiled_in_as_an_include(tmp_path: Path) -> None:
    (tmp_path / "0001-a.patch").write_text("diff\n")
    (tmp_path / "verified_projectors.txt").write_text(
        "# type   test that proves it\ngemma3   tests/x.py\n\nqwen2vl_merger\n"
    )
    ps = patch_set(tmp_path)
    tree = tmp_path / "tree"
    (tree / "tools" / "server").mkdir(parents=True)
    write_generated(tree, ps)
    include = (tree / VERIFIED_INCLUDE).read_text()
    assert '"gemma3", \\' in include and '"qwen2vl_merger", \\' in include
    assert read_verified_projectors(ps) == ["gemma3", "qwen2vl_merger"]
    (tmp_path / "verified_projectors.txt").write_text("Gemma 3\n")
    with pytest.raises(PatchError, match="not a projector type name"):
        read_verified_projectors(patch_set(tmp_path))
