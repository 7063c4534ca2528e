#!/usr/bin/env python3
"""llama.cpp's own server tests, straight at llama-server and through vcache, compared.

The suite is tools/server/tests of the pinned llama.cpp (the llama-cpp-python sdist's vendored
tree, or ``--source`` for a checkout of your own). It starts a llama-server per test with Hugging
Face model flags; here those resolve, offline, to generated stand-ins laid out as a Hugging Face
cache (`vision_cache.synthetic.stand_ins`, the tiny gemma3 VLM), and the server binary is
tests/conformance/shim.py, which runs llama-server itself or vcache in front of it.

For each upstream (stock, and patched with packages on) the same selection runs twice, direct
and through `vcache serve --upstream`, all runs at once; then the two are compared test by
test. The exit status is 1 if any test passes direct and fails through vcache::

    python -m scripts.conformance                  # stock and patched, 2 pytest workers each
    python -m scripts.conformance --upstream patched -k test_security
    python -m scripts.conformance --json results.json

Tests that need the internet or a real model's text are skipped with the reason given in
tests/conformance/skips.txt. Results: docs/conformance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.llama_server import built_binary
from vision_cache.llama.server_build.source import resolve_source
from vision_cache.synthetic.images import sample_image
from vision_cache.synthetic.models import generate
from vision_cache.synthetic.stand_ins import write_all

ROOT = Path(__file__).resolve().parent.parent

CONFORMANCE = ROOT / "tests" / "conformance"
FRONTS = ("direct", "vcache")
# what each upstream variant runs with (patched: packages on, so images take the cache path)
UPSTREAM_ARGS = {"stock": "", "patched": "--image-embedding"}
FAKE_COMMIT = "0" * 40
IMAGES = ("shapes_640x480", "checkers_1024x256")
REGRESSED = "passed direct, not through vcache"


def hf_cache_layout(models: Path, gemma: Path) -> dict[str, dict[str, Path]]:
    """repo -> {path in the repo: local file}: what the suite's presets and tests ask for."""
    llama, bert, rerank = models / "llama.gguf", models / "bert.gguf", models / "rerank.gguf"
    return {
        "ggml-org/test-model-stories260K": {"stories260K-F32.gguf": llama},
        "ggml-org/test-model-stories260K-infill": {"stories260K-infill-F32.gguf": llama},
        "ggml-org/stories15M_MOE": {"stories15M_MOE-F16.gguf": llama},
        "ggml-org/models": {
            "tinyllamas/stories260K.gguf": llama,
            "bert-bge-small/ggml-model-f16.gguf": bert,
            "jina-reranker-v1-tiny-en/ggml-model-f16.gguf": rerank,
        },
        "ggml-org/tinygemma3-GGUF": {
            "tinygemma3-Q8_0.gguf": gemma / "model.gguf",
            "mmproj-tinygemma3.gguf": gemma / "mmproj.gguf",
        },
    }


def write_hf_cache(cache: Path, layout: dict[str, dict[str, Path]]) -> None:
    """The layout llama.cpp reads with --offline: models--ORG--REPO/{refs/main,snapshots/C/}."""
    for repo, files in layout.items():
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(FAKE_COMMIT)
        for name, target in files.items():
            link = root / "snapshots" / FAKE_COMMIT / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(target.resolve())


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Everything the runs share, under one directory."""

    root: Path
    tree: Path  # llama.cpp source tree
    python: Path  # the suite's virtualenv interpreter
    hf_cache: Path
    images: Path
    draft: Path  # the speculative tests' draft model, which they download into tmp/


def prepare(root: Path, source: str | None) -> Workspace:
    # the builds' cache, as tests.support.llama_server.built_binary uses it
    cache = Path(os.environ.get("VCACHE_LLAMA_CACHE") or ROOT / ".build" / "llama")
    tree = resolve_source(Path(source) if source else None, cache).tree
    models = root / "models"
    stand_ins = write_all(models)
    gemma = generate("gemma3", "tiny", 0, models).model.parent
    write_hf_cache(root / "hf-cache", hf_cache_layout(models, gemma))
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        (images / f"{name}.png").write_bytes(sample_image(name).encode("PNG"))
    return Workspace(
        root, tree, suite_venv(root / "venv", tree), root / "hf-cache", images, stand_ins["llama"]
    )


def suite_venv(venv: Path, tree: Path) -> Path:
    """A virtualenv with the suite's own pinned requirements (and pytest-xdist)."""
    requirements = tree / "tools" / "server" / "tests" / "requirements.txt"
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_text() != requirements.read_text():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
            ],
            check=True,
        )
        stamp.write_text(requirements.read_text())
    return venv / "bin" / "python"


@dataclasses.dataclass(frozen=True)
class Run:
    upstream: str  # stock | patched
    front: str  # direct | vcache
    port_base: int

    @property
    def name(self) -> str:
        return f"{self.upstream}-{self.front}"


def suite_copy(ws: Workspace, run_dir: Path) -> Path:
    """A copy of the suite per run: it writes tmp/ in its own directory, and reads
    ../../../models/templates and ../../../tools/mtmd/test-1.jpeg."""
    shutil.rmtree(run_dir, ignore_errors=True)
    tests = run_dir / "tools" / "server" / "tests"
    shutil.copytree(ws.tree / "tools" / "server" / "tests", tests)
    shutil.copytree(ws.tree / "models" / "templates", run_dir / "models" / "templates")
    (run_dir / "tools" / "mtmd").mkdir(parents=True)
    shutil.copy(ws.tree / "tools" / "mtmd" / "test-1.jpeg", run_dir / "tools" / "mtmd")
    # runs side by side need their own ports: the suite hard-codes 8080 + 10 per worker
    conftest = tests / "conftest.py"
    fixed = "str(8080 + worker_num * 10)"
    text = conftest.read_text()
    if fixed not in text:
        raise SystemExit(f"{conftest}: no {fixed!r} to give a base port (suite changed?)")
    conftest.write_text(
        text.replace(fixed, 'str(int(os.environ["CONFORMANCE_PORT_BASE"]) + worker_num * 10)')
    )
    (tests / "tmp").mkdir()
    shutil.copy(ws.draft, tests / "tmp" / "stories15M-q4_0.gguf")
    return tests


def run_suite(
    ws: Workspace, run: Run, server: Path, args: argparse.Namespace, recheck: Sequence[str] = ()
) -> Path:
    """One run of the selection; with `recheck`, those tests alone, one worker."""
    run_dir = ws.root / "runs" / (run.name + ("-recheck" if recheck else ""))
    tests = suite_copy(ws, run_dir)
    vcache = Path(sys.executable).with_name("vcache")
    env = {
        **os.environ,
        "LLAMA_SERVER_BIN_PATH": str(CONFORMANCE / "shim.py"),
        "CONFORMANCE_SERVER": str(server),
        "CONFORMANCE_SERVER_ARGS": UPSTREAM_ARGS[run.upstream],
        "CONFORMANCE_FRONT": "none" if run.front == "direct" else "upstream",
        "CONFORMANCE_VCACHE": str(vcache),
        "CONFORMANCE_TMP": str(run_dir),
        "CONFORMANCE_PORT_BASE": str(run.port_base),
        "PORT": str(run.port_base),
        "CONFORMANCE_IMAGES": str(ws.images),
        "LLAMA_CACHE": str(ws.hf_cache),
        "LLAMA_ARG_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{tests}",
    }
    junit = run_dir / "junit.xml"
    cmd = [
        str(ws.python),
        "-m",
        "pytest",
        "-p",
        "tests.conformance.suite_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rN",
        "--junitxml",
        str(junit),
        "-m",
        "not slow",
        "-n",
        str(1 if recheck else args.workers),
        "--dist",
        "worksteal",
        *(recheck or args.pytest_args),
    ]
    started = time.monotonic()
    with open(run_dir / "pytest.log", "w") as log:
        subprocess.run(cmd, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    print(f"{run.name}: {time.monotonic() - started:.0f} s ({run_dir / 'pytest.log'})", flush=True)
    return junit


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed | failed | skipped, message)."""
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        state, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                state = "skipped" if child.tag == "skipped" else "failed"
                message = (
                    (child.get("message") or "").splitlines()[0][:200]
                    if child.get("message")
                    else ""
                )
        test_id = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        results[test_id] = (state, message)
    return results


def compare(
    direct: dict[str, tuple[str, str]],
    via: dict[str, tuple[str, str]],
) -> dict[str, list[str]]:
    """Each test id sorted into passed both / failed both / skipped / regressed / ..."""
    groups: dict[str, list[str]] = {}
    for test_id in sorted(set(direct) | set(via)):
        d, v = direct.get(test_id, ("missing", ""))[0], via.get(test_id, ("missing", ""))[0]
        if d == v:
            key = {"passed": "passed both", "failed": "failed both"}.get(d, d)
        elif d == "passed":
            key = REGRESSED
        elif v == "passed":
            key = "passed through vcache only"
        else:
            key = f"{d} direct, {v} through vcache"
        groups.setdefault(key, []).append(test_id)
    return groups


def recheck(
    ws: Workspace,
    upstream: str,
    server: Path,
    args: argparse.Namespace,
    groups: dict[str, list[str]],
) -> dict[str, list[str]]:
    """Runs the tests that passed direct only once more, alone, both ways: a difference that
    comes back is vcache's; one that does not was the machine's (the suite has timing tests,
    and four runs share the cores). The second look is reported as such."""
    regressed = groups.get(REGRESSED, [])
    if not regressed:
        return groups
    direct, via = (
        outcomes(run_suite(ws, Run(upstream, front, 19080), server, args, regressed))
        for front in FRONTS
    )
    again = compare(direct, via)
    kept = {k: [t for t in v if t not in regressed] for k, v in groups.items()}
    kept[REGRESSED] = again.get(REGRESSED, [])
    flaky = [t for t in regressed if t not in kept[REGRESSED]]
    kept["differed once, not on a second run alone"] = flaky
    return {k: v for k, v in kept.items() if v}


def report(upstream: str, groups: dict[str, list[str]], via: dict[str, tuple[str, str]]) -> bool:
    counts = Counter({k: len(v) for k, v in groups.items()})
    print(f"\n{upstream}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    regressed = groups.get(REGRESSED, [])
    for test_id in regressed:
        print(f"  REGRESSION {test_id}: {via.get(test_id, ('', ''))[1]}")
    return not regressed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", choices=("stock", "patched", "both"), default="both")
    p.add_argument("--source", help="a llama.cpp checkout (default: the pinned sdist's tree)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".build" / "conformance")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per run")
    p.add_argument("--json", type=Path, help="write the comparison here")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest (default: unit)")
    args = p.parse_args(argv)
    args.pytest_args = args.pytest_args or ["unit"]
    ws = prepare(args.workdir.resolve(), args.source)
    upstreams = ("stock", "patched") if args.upstream == "both" else (args.upstream,)
    runs = [
        Run(u, f, 18080 + 200 * i)
        for i, (u, f) in enumerate((u, f) for u in upstreams for f in FRONTS)
    ]
    servers = {u: built_binary(u) for u in upstreams}
    with ThreadPoolExecutor(len(runs)) as pool:
        junits = dict(
            zip(
                runs,
                pool.map(lambda r: run_suite(ws, r, servers[r.upstream], args), runs),
                strict=True,
            )
        )
    by_name = {r.name: j for r, j in junits.items()}
    ok, summary = True, {}
    for upstream in upstreams:
        direct = outcomes(by_name[f"{upstream}-direct"])
        via = outcomes(by_name[f"{upstream}-vcache"])
        groups = recheck(ws, upstream, servers[upstream], args, compare(direct, via))
        ok = report(upstream, groups, via) and ok
        summary[upstream] = groups
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
