"""Configuration of every `vcache` command, from flags, environment and TOML (pydantic-settings).

Precedence, highest first: command-line flags, ``VCACHE_*`` environment variables, the TOML
file named by ``--config`` (or ``VCACHE_CONFIG``), the defaults below. The command-line options
are generated from the fields, so ``--help`` documents every one of them with its default, and
the README's configuration table is checked against the same fields by a test.

One file serves every command; each reads the tables it needs::

    [serve]          # vcache serve (and the store the other commands use)
    upstream = "http://127.0.0.1:8080"
    store = "/data/vcache"
    hot_mb = 1024

    [client]         # vcache warm, compare and import: the proxy they talk to
    proxy = "http://127.0.0.1:8081"

| settings | commands | reads |
|---|---|---|
| `ServeSettings` | serve | ``[serve]`` (or the whole file when it has no tables) |
| `StoreCommandSettings` | ls, names, stats, rm, pin, unpin, gc, verify, export | ``store`` and |
| | | ``api_key`` from ``[serve]`` |
| `ClientSettings` | warm, compare | ``[client]``, then ``api_key`` from ``[serve]`` |
| `ImportSettings` | import | ``[client]``, then ``store`` and ``api_key`` from ``[serve]`` |
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from proxy.cli.failure import USAGE, CommandError
from proxy.web.listen import parse_hosts
from vision_cache.client.admin_api import DEFAULT_PROXY
from vision_cache.shared.tier import SharedTierConfig

DEFAULT_STORE = Path("~/.cache/vcache/store")  # the one default: serve and every store command
TABLES = ("serve", "client")
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "vcache_toml", default=None
)


class VcacheSettings(BaseSettings):
    """What every command's settings share: the sources, and their precedence."""

    model_config = SettingsConfigDict(env_prefix="VCACHE_", extra="forbid", frozen=True)
    # the TOML tables this command reads, the first that has a key winning
    toml_tables: ClassVar[tuple[str, ...]] = ("serve",)
    # read every key of the first table (a misspelt one is an error), or only the keys it knows
    # (the tables hold other commands' settings too)
    toml_strict: ClassVar[bool] = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(_TomlTables(settings_cls, toml))
        return tuple(sources)


class StoreSettings(VcacheSettings):
    """`vcache ls`, `stats`, `rm`, `gc`, `verify`, `export`: the store the proxy uses."""

    store: Path = Field(DEFAULT_STORE, description="cache directory")

    @field_validator("store")
    @classmethod
    def _expand_store(cls, v: Path) -> Path:
        v = v.expanduser()
        if v.exists() and not v.is_dir():
            raise ValueError("a file, not a directory (give a new path, or a store's)")
        return v


class StoreCommandSettings(StoreSettings):
    """`vcache ls`, `names`, `stats`, `rm`, `pin`, `unpin`, `gc`, `verify`, `export`: the store,
    or the store of the running proxy named by `proxy` (a flag or VCACHE_PROXY: the file's
    [serve] table names the proxy's own store already)."""

    proxy: str | None = Field(
        None,
        description="a running vcache proxy: act on the store it uses (it says where that is)",
    )
    api_key: SecretStr | None = Field(
        None, description="the proxy's key, if it has one (X-Vcache-Key)"
    )

    @field_validator("proxy")
    @classmethod
    def _proxy_is_a_url(cls, v: str | None) -> str | None:
        if v is not None:
            check_http_url(v, "a vcache proxy's address, such as http://127.0.0.1:8081")
        return v


class ClientSettings(VcacheSettings):
    """`vcache warm`: a running proxy."""

    toml_tables = ("client", "serve")

    proxy: str = Field(DEFAULT_PROXY, description="the running vcache proxy")
    api_key: SecretStr | None = Field(
        None, description="the proxy's key, if it has one (X-Vcache-Key)"
    )

    @field_validator("proxy")
    @classmethod
    def _proxy_is_a_url(cls, v: str) -> str:
        check_http_url(v, "a vcache proxy's address, such as http://127.0.0.1:8081")
        return v


class ImportSettings(ClientSettings, StoreSettings):
    """`vcache import`: a running proxy (whose model the pack must match) and its store."""


class ServeSettings(StoreSettings):
    """Settings of one proxy."""

    toml_strict = True

    upstream: str | None = Field(None, description="URL of a running llama-server to front")
    llama_server: Path | None = Field(
        None,
        description="llama-server binary to start and manage (managed mode); its "
        "arguments follow `--`",
    )
    llama_args: list[str] = Field(
        default_factory=list,
        description="arguments for the managed "
        "llama-server (on the command line: everything after `--`)",
    )
    host: str = Field(
        "127.0.0.1",
        description="address to listen on; several separated by commas, as llama-server "
        "takes them (127.0.0.1,::1)",
    )
    port: int = Field(8081, ge=0, le=65535, description="port to listen on (0: any free port)")
    hot_mb: int = Field(512, ge=0, description="in-memory tier budget in MiB (0 disables it)")
    disk_gb: float = Field(20.0, gt=0, description="disk tier budget in GiB")
    transport: Literal["auto", "file", "inline"] = Field(
        "auto",
        description="how packages reach upstream: by file reference (upstream reads "
        "the cache directory), inline in the JSON, or auto: by file reference whenever "
        "upstream shares the cache directory (the token it wrote there is found in it), "
        "else inline",
    )
    api_key: SecretStr | None = Field(
        None,
        description="key for the proxy's own /vcache/ "
        "endpoints (X-Vcache-Key or Authorization: Bearer)",
    )
    max_body_mb: int = Field(100, gt=0, description="largest request body in MiB (413 above)")
    max_images: int = Field(32, gt=0, description="most images in one request")
    upstream_idle_s: float = Field(
        600.0,
        gt=0,
        description="longest wait for upstream's "
        "next byte (its headers, or the next chunk of a "
        "stream) before the request fails (504)",
    )
    media_path: Path | None = Field(
        None,
        description="directory file:// image URLs may read from (managed mode: "
        "llama-server's own --media-path; without one, file URLs go to upstream as they came)",
    )
    allow_private_urls: bool = Field(
        False,
        description="let image URLs reach loopback and "
        "private addresses (off: public addresses only)",
    )
    url_max_mb: int = Field(20, gt=0, description="largest image fetched from a URL, in MiB")
    url_timeout_s: float = Field(10.0, gt=0, description="time limit for fetching one image URL")
    accept_client_packages: bool = Field(
        False,
        description="accept image_embedding inputs "
        "from clients (off: a forged package could poison "
        "upstream's prompt cache)",
    )
    shared_store: SecretStr | None = Field(
        None,
        description="Redis URL of a tier shared by a fleet of proxies (redis://host:6379/0, "
        "rediss:// for TLS); off when unset",
    )
    shared_cluster: bool = Field(
        False, description="the shared store URL names one node of a Redis Cluster"
    )
    shared_prefix: str = Field(
        "vcache:", description="key prefix in Redis, so that several deployments can share one"
    )
    shared_timeout_ms: int = Field(
        500,
        gt=0,
        description="time limit for one round trip to "
        "Redis; a timeout makes the proxy skip Redis for a while",
    )
    shared_ttl_h: float = Field(
        168.0,
        gt=0,
        description="lifetime in Redis of unpinned entries, in hours (pinned entries never expire)",
    )
    shared_username: str | None = Field(None, description="Redis user, when the URL names none")
    shared_password: SecretStr | None = Field(
        None,
        description="Redis password, when the URL has none (best set as VCACHE_SHARED_PASSWORD)",
    )
    result_cache: bool = Field(
        False,
        description="answer fully determined requests (greedy "
        "or seeded) from the store when the same request was answered "
        "before (per request: X-Vcache-Result-Cache: on or off)",
    )
    result_ttl_h: float = Field(168.0, gt=0, description="lifetime of a cached answer, in hours")
    embedding_upstream: str | None = Field(
        None,
        description="URL of a llama-server started with --embeddings and an mmproj: "
        "compare shortlists references by its vectors (unset: by mean-pooled packages, a "
        "weaker recall)",
    )
    encoder: Literal["auto", "local", "server", "upstream"] = Field(
        "auto",
        description="who encodes on a miss: llama-server (server, the default, or auto; "
        "`upstream` is its former name): the request goes with its image and the server "
        "exports the package as it encodes it, one round trip; or local encoder worker "
        "processes (the LLM server then only decodes packages, but each miss costs an encode "
        "beside the server's work and a second round trip)",
    )
    admit_min_encode_ms: float | None = Field(
        None,
        ge=0,
        description="cache only packages whose encode took at least this many milliseconds "
        "(unset: those whose encode took longer than a hit of their size costs by the "
        "transport in use; 0: every package)",
    )
    encoder_workers: int = Field(1, ge=1, description="local encoder worker processes")
    encoder_threads: int = Field(2, ge=1, description="threads per local encoder worker")
    encoder_gpu: bool = Field(
        False, description="run the local encoder on a GPU (a build with GPU support)"
    )
    encoder_timeout_s: float = Field(600.0, gt=0, description="time limit for one local encode")
    backend: Literal["llama-server", "llama-cpp-python"] = Field(
        "llama-server",
        description="what generates: a llama-server (--upstream or "
        "--llama-server), or llama-cpp-python in this process (--model, --mmproj)",
    )
    model: Path | None = Field(
        None,
        description="text model GGUF for the llama-cpp-python "
        "backend and the local encoder (managed mode: taken from -m)",
    )
    mmproj: Path | None = Field(
        None,
        description="mmproj GGUF for the llama-cpp-python "
        "backend and the local encoder (managed mode: from --mmproj)",
    )
    n_ctx: int = Field(4096, ge=256, description="context size of the llama-cpp-python backend")
    llama_lib_dir: Path | None = Field(
        None,
        description="llama.cpp shared libraries for "
        "llama-cpp-python (default: beside --llama-server, else "
        "$LLAMA_CPP_LIB_PATH)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("media_path", "llama_server", "model", "mmproj", "llama_lib_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("upstream")
    @classmethod
    def _upstream_is_a_url(cls, v: str | None) -> str | None:
        if v is not None:
            check_http_url(v, "a llama-server's address, such as http://127.0.0.1:8080")
        return v

    @field_validator("llama_server")
    @classmethod
    def _binary_runs(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file (build llama-server with `make llama`)")
        if v is not None and not os.access(v, os.X_OK):
            raise ValueError("not executable")
        return v

    @model_validator(mode="after")
    def _one_upstream(self) -> ServeSettings:
        if self.backend == "llama-cpp-python":
            if self.upstream or self.llama_server or self.encoder == "local":
                raise ValueError(
                    "--backend llama-cpp-python runs the model itself: no "
                    "--upstream, --llama-server or --encoder local"
                )
            if self.model is None or self.mmproj is None:
                raise ValueError("--backend llama-cpp-python needs --model and --mmproj")
            return self
        if (self.upstream is None) == (self.llama_server is None):
            raise ValueError("give exactly one of --upstream URL and --llama-server PATH")
        if self.encoder == "local" and (self.encoder_model is None or self.encoder_mmproj is None):
            raise ValueError(
                "--encoder local needs --model and --mmproj (in managed mode, "
                "-m and --mmproj among the llama-server arguments do)"
            )
        if self.llama_args and self.llama_server is None:
            raise ValueError("arguments after `--` are for --llama-server (managed mode)")
        if self.llama_server is not None:
            _managed_arguments_usable(self.llama_args)
        return self

    @model_validator(mode="after")
    def _shared_tier_works(self) -> ServeSettings:
        self.shared_config  # noqa: B018 -- building it checks URL, prefix and limits at startup
        return self

    @property
    def shared_config(self) -> SharedTierConfig | None:
        if self.shared_store is None:
            return None
        password = self.shared_password.get_secret_value() if self.shared_password else None
        return SharedTierConfig(
            self.shared_store.get_secret_value(),
            prefix=self.shared_prefix,
            cluster=self.shared_cluster,
            username=self.shared_username,
            password=password,
            timeout_s=self.shared_timeout_ms / 1000,
            ttl_s=self.shared_ttl_h * 3600,
        )

    @property
    def encoder_model(self) -> Path | None:
        return self.model or _arg_value(self.llama_args, ("-m", "--model"))

    @property
    def encoder_mmproj(self) -> Path | None:
        return self.mmproj or _arg_value(self.llama_args, ("-mm", "--mmproj"))

    @property
    def media_root(self) -> Path | None:
        """Where file:// URLs read from: --media-path, else the managed llama-server's own.

        In managed mode both read the same files, so the proxy can cache them; without
        either, file URLs are forwarded to upstream as they came (its rule decides).
        """
        if self.media_path is not None or not self.managed:
            return self.media_path
        return _arg_value(self.llama_args, ("--media-path",))

    @property
    def lib_dir(self) -> Path | None:
        """The llama.cpp libraries llama-cpp-python runs on: the patched build's, if known."""
        if self.llama_lib_dir is not None:
            return self.llama_lib_dir
        return self.llama_server.parent if self.llama_server is not None else None

    @field_validator("host")
    @classmethod
    def _hosts_parse(cls, v: str) -> str:
        parse_hosts(v)  # refused at startup, not when the listener starts
        return v

    @property
    def hosts(self) -> tuple[str, ...]:
        return parse_hosts(self.host)

    @property
    def managed(self) -> bool:
        return self.llama_server is not None

    @property
    def resolved_encoder(self) -> Literal["local", "server"]:
        """Who encodes on a miss: llama-server unless told otherwise. A miss then costs what
        it costs without vcache (the server encodes once, for the request, and exports the
        package as it goes); local workers cost a second encode path beside the server's on
        the same cores and another round trip, for the benefit of text requests that would
        otherwise wait out a long encode (README, "Who encodes a miss")."""
        return "local" if self.encoder == "local" else "server"


class _TomlTables(TomlConfigSettingsSource):
    """The tables of a TOML file that one command reads (see the module docstring)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls, toml_file=path)
        assert issubclass(settings_cls, VcacheSettings)
        data = self.toml_data
        if not any(isinstance(data.get(t), dict) for t in TABLES):
            data = {"serve": data}  # a file without tables is the serve settings
        merged: dict[str, Any] = {}
        for table in settings_cls.toml_tables:
            for name, value in (data.get(table) or {}).items():
                if settings_cls.toml_strict or name in settings_cls.model_fields:
                    merged.setdefault(name, value)
        self.toml_data = self.init_kwargs = merged


def check_http_url(url: str, example: str) -> None:
    """Refuse what is not an http(s) URL with a host (and a port that is a number)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as e:
        raise ValueError(f"not a URL ({e}); give {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL; give {example}")


def _managed_arguments_usable(args: list[str]) -> None:
    """What managed mode sets itself must not come from the user (checked before anything runs)."""
    # the supervisor holds the rule; importing it here is cheap next to what serving loads
    from proxy.upstream.supervisor import refuse_reserved

    refuse_reserved(args, os.environ)


def _arg_value(args: list[str], names: tuple[str, ...]) -> Path | None:
    """The value of a llama-server option among `args` (`-m X` or `--model=X`)."""
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return Path(args[i + 1]).expanduser()
        name, eq, value = arg.partition("=")
        if eq and name in names:
            return Path(value).expanduser()
    return None


SettingsT = TypeVar("SettingsT", bound=VcacheSettings)


# VCACHE_* variables that are no setting of any command: the rest are refused as misspellings
OTHER_VARIABLES = frozenset(
    {
        "VCACHE_CONFIG",  # the TOML file
        "VCACHE_DEBUG",  # tracebacks on errors (proxy.cli.main)
        "VCACHE_LOG_FORMAT",  # text or json (proxy.cli.main)
        "VCACHE_MODELS_DIR",  # generated test models (tests, make models)
        "VCACHE_LLAMA_CACHE",  # llama-server builds
        "VCACHE_LLAMA_SERVER_PATCHED",  # the builds tests use
        "VCACHE_LLAMA_SERVER_STOCK",
        "VCACHE_DISCONNECT_CYCLES",  # test knobs
        "VCACHE_STRESS_OPS",
    }
)
OTHER_PREFIXES = ("VCACHE_TEST_",)


class SettingsError(CommandError, ValueError):
    """Settings that cannot work, with where they came from (flag, variable or file)."""


def known_variables() -> set[str]:
    fields: set[str] = set()
    for cls in (ServeSettings, ImportSettings):
        fields |= set(cls.model_fields)
    return {f"VCACHE_{name.upper()}" for name in fields} | OTHER_VARIABLES


def check_environment(environ: typing.Mapping[str, str]) -> None:
    """Refuse VCACHE_* variables that nothing reads: a misspelt one would be silently ignored."""
    known = known_variables()
    for name in sorted(environ):
        if not name.startswith("VCACHE_") or name in known or name.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SettingsError(
            f"unknown environment variable {name}",
            f"{hint}unset it (`vcache serve --help` lists the variables)",
            USAGE,
        )


def _config_path(toml: Path | None) -> Path | None:
    path = toml or (Path(os.environ["VCACHE_CONFIG"]) if os.environ.get("VCACHE_CONFIG") else None)
    if path is None:
        return None
    if not path.is_file():
        raise SettingsError(
            f"config file not found: {path}",
            "give the path of a TOML file (--config, VCACHE_CONFIG)",
            USAGE,
        )
    try:
        tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid TOML: {e}", None, USAGE) from None
    except OSError as e:
        raise SettingsError(f"{path}: {e.strerror}", None, USAGE) from None
    return path


def load(cls: type[SettingsT], flags: dict[str, Any], toml: Path | None = None) -> SettingsT:
    """Settings from command-line `flags` (only those given), env and the TOML file.

    Raises `SettingsError` naming where each bad value came from."""
    check_environment(os.environ)
    path = _config_path(toml)
    given = {k: v for k, v in flags.items() if k in cls.model_fields}
    token = _toml_path.set(path)
    try:
        return cls(**given)
    except ValidationError as e:
        raise _explained(e, cls, given, path) from None
    finally:
        _toml_path.reset(token)


def _explained(
    e: ValidationError, cls: type[VcacheSettings], given: dict[str, Any], path: Path | None
) -> SettingsError:
    lines, whole = [], False
    for err in e.errors(include_url=False):
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:
            whole = True
            lines.append(message)
            continue
        name = str(err["loc"][0])
        lines.append(_where(name, cls, given, path, err["type"]) + message)
    # a combination of options that cannot work is shown under the command's usage line
    return SettingsError("; ".join(lines), None, USAGE, usage=whole)


def _where(
    name: str, cls: type[VcacheSettings], given: dict[str, Any], path: Path | None, kind: str
) -> str:
    """Where the value of setting `name` came from, for the error message."""
    flag = "--" + name.replace("_", "-")
    if name in given:
        return f"{flag} {given[name]!r}: " if kind != "extra_forbidden" else f"{flag}: "
    env = f"VCACHE_{name.upper()}"
    if env in os.environ and name in cls.model_fields:
        return f"{env}={os.environ[env]!r}: "
    if path is not None:
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
            also = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{path}: unknown setting {name!r}{also}: "
        return f"{path}: {name}: "
    return f"{flag}: "


def load_settings(flags: dict[str, Any], toml: Path | None = None) -> ServeSettings:
    """`vcache serve`'s settings (see `load`)."""
    return load(ServeSettings, flags, toml)


def settings_from(args: argparse.Namespace, cls: type[SettingsT]) -> SettingsT:
    """The settings of one command from its parsed arguments (see `add_arguments`)."""
    return load(cls, vars(args), getattr(args, "config", None))


def settings_error(e: Exception) -> str:
    """What was wrong with the settings, in one line per problem."""
    if isinstance(e, CommandError):
        return e.message
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        )
    return str(e)


def add_arguments(
    parser: argparse.ArgumentParser, cls: type[VcacheSettings] = ServeSettings
) -> None:
    """`--config` and one option per field of `cls`; unset options stay out of the namespace
    (env and TOML apply)."""
    tables = ", ".join(f"[{t}]" for t in cls.toml_tables)
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML file; this command reads its {tables} table (env: VCACHE_CONFIG)",
    )
    for name, field in cls.model_fields.items():
        if name == "llama_args":
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else default
        help_text = f"{field.description} (default: {shown}; env: VCACHE_{name.upper()})"
        if field.annotation is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            choices = _choices(field.annotation)
            parser.add_argument(
                flag,
                default=argparse.SUPPRESS,
                help=help_text,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
            )


def _choices(annotation: Any) -> list[str] | None:
    """The allowed values of a Literal field, so that --help shows them."""
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None
