"""One configuration for every `vcache` command: flags over VCACHE_* over the TOML file.

Regression: `vcache ls` and `vcache stats` used to ignore the config file's store (each
command had its own idea of the default store, and only `serve` read the file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from proxy.cli.config import (
    DEFAULT_STORE,
    ClientSettings,
    ImportSettings,
    ServeSettings,
    StoreSettings,
    load,
)
from proxy.cli.main import main
from tests.support.store_helpers import key, meta_for, payload_for
from vision_cache import Store
from vision_cache.client.admin_api import DEFAULT_PROXY


@pytest.fixture(autouse=True)
def no_vcache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VCACHE_STORE", "VCACHE_PROXY", "VCACHE_API_KEY", "VCACHE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def make_store(root: Path, entries: int) -> Path:
    with Store.open(root, hot_bytes=0) as store:
        for i in range(entries):
            assert store.put(key(i), meta_for(key(i)), payload_for(key(i))) is not None
    return root


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def listed(capsys: pytest.CaptureFixture[str]) -> int:
    return len(json.loads(capsys.readouterr().out))


def test_ls_and_stats_use_the_config_files_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_store(tmp_path / "proxy-store", 2)
    config = write_config(
        tmp_path / "vcache.toml", f'[serve]\nupstream = "http://127.0.0.1:9"\nstore = "{root}"\n'
    )
    assert main(["ls", "--config", str(config), "--json"]) == 0
    assert listed(capsys) == 2
    assert main(["stats", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 2


def test_flags_win_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    in_file = make_store(tmp_path / "file", 1)
    in_env = make_store(tmp_path / "env", 2)
    on_flag = make_store(tmp_path / "flag", 3)
    config = write_config(tmp_path / "vcache.toml", f'[serve]\nstore = "{in_file}"\n')
    monkeypatch.setenv("VCACHE_CONFIG", str(config))
    assert main(["ls", "--json"]) == 0
    assert listed(capsys) == 1
    monkeypatch.setenv("VCACHE_STORE", str(in_env))
    assert main(["ls", "--json"]) == 0
    assert listed(capsys) == 2
    assert main(["ls", "--json", "--store", str(on_flag)]) == 0
    assert listed(capsys) == 3


def test_every_command_has_one_default_store() -> None:
    for cls in (StoreSettings, ImportSettings, ServeSettings):
        assert cls.model_fields["store"].default == DEFAULT_STORE
    assert load(StoreSettings, {}).store == DEFAULT_STORE.expanduser()


def test_the_client_commands_read_the_client_table_then_the_serve_table(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "vcache.toml",
        '[serve]\nstore = "/srv/store"\napi_key = "from-serve"\n'
        '[client]\nproxy = "http://10.0.0.2:8081"\n',
    )
    client = load(ClientSettings, {}, config)
    assert client.proxy == "http://10.0.0.2:8081"
    assert client.api_key is not None and client.api_key.get_secret_value() == "from-serve"
    assert load(ImportSettings, {}, config).store == Path("/srv/store")
    assert load(ClientSettings, {}).proxy == DEFAULT_PROXY


def test_a_file_without_tables_is_the_serve_settings(tmp_path: Path) -> None:
    config = write_config(tmp_path / "flat.toml", 'upstream = "http://127.0.0.1:9"\nhot_mb = 7\n')
    assert load(ServeSettings, {}, config).hot_mb == 7
    assert load(StoreSettings, {}, config).store == DEFAULT_STORE.expanduser()


def test_serve_refuses_a_misspelt_key_that_other_commands_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_store(tmp_path / "s", 1)
    config = write_config(tmp_path / "typo.toml", f'[serve]\nstore = "{root}"\nhot_mbb = 1\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert "hot_mbb" in capsys.readouterr().err
    assert main(["ls", "--config", str(config), "--json"]) == 0
    assert listed(capsys) == 1


def test_a_missing_config_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["ls"], ["export", str(tmp_path / "p.vcpack")], ["warm", "x.png"]):
        assert main([*command, "--config", str(tmp_path / "none.toml")]) == 2
        assert "config file not found" in capsys.readouterr().err


def test_every_vcache_variable_the_project_reads_is_known() -> None:
    """`vcache` refuses VCACHE_* variables it does not know (a misspelt one would be ignored):
    every one the project itself reads or documents must be known, or the tests and make
    targets that set it would be refused."""
    from proxy.cli.config import OTHER_PREFIXES, known_variables

    root = Path(__file__).resolve().parents[1]
    files = [root / "Makefile", root / "README.md"]
    for folder in ("proxy", "vision_cache", "tests", "scripts", "docs"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
    named = set()
    for path in files:
        named |= set(re.findall(r"\bVCACHE_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    # a compile definition of the llama-server build; the misspelling tests make on purpose
    not_variables = {"VCACHE_BUILD_ID", "VCACHE_STOR"}
    unknown = sorted(
        n
        for n in named - not_variables - known_variables()
        if not n.startswith(OTHER_PREFIXES) and not n.startswith("VCACHE_LLAMA_SERVER_")
    )
    assert unknown == []
