"""`vcache serve`: wire store, upstream (or a managed llama-server) and the app, and run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from proxy.cli.config import ServeSettings
from proxy.errors import StartupError, UpstreamError
from proxy.images.media import FetchPolicy, MediaLoader
from proxy.lookup.admission import Admission
from proxy.lookup.package_lookup import PackageLookup
from proxy.lookup.result_cache import ResultCache
from proxy.upstream.client import Upstream
from proxy.upstream.supervisor import ManagedServer, ManagedServerConfig, ManagedStartError
from proxy.version import VERSION
from proxy.web.app import create_app
from proxy.web.metrics import Metrics
from proxy.web.site import bind_listeners, run_until_signalled, running_site
from proxy.web.state import Limits, Proxy
from vision_cache.client.admin_api import ManagedState
from vision_cache.errors import VisionCacheError
from vision_cache.shared.tier import SharedTier, shared_tier
from vision_cache.store import Store

if TYPE_CHECKING:  # imported where used: a proxy in front of llama-server loads neither
    from proxy.backends.llama_cpp import LlamaCppSettings
    from proxy.lookup.local_encoder import LocalEncoder

log = logging.getLogger("vcache.serve")
MIB = 1024 * 1024


def llama_cpp_settings(settings: ServeSettings) -> LlamaCppSettings:
    from proxy.backends.llama_cpp import LlamaCppSettings

    assert settings.model is not None and settings.mmproj is not None
    return LlamaCppSettings(
        model=settings.model,
        mmproj=settings.mmproj,
        store=settings.store,
        lib_dir=settings.lib_dir,
        n_ctx=settings.n_ctx,
        n_threads=settings.encoder_threads,
        mmproj_use_gpu=settings.encoder_gpu,
        host=settings.host,
        port=settings.port,
        hot_mb=settings.hot_mb,
        disk_gb=settings.disk_gb,
        max_body_mb=settings.max_body_mb,
        max_images=settings.max_images,
        fetch=fetch_policy(settings),
    )


def fetch_policy(settings: ServeSettings) -> FetchPolicy:
    return FetchPolicy(
        allow_private=settings.allow_private_urls,
        max_bytes=settings.url_max_mb * MIB,
        timeout_s=settings.url_timeout_s,
        media_root=settings.media_root,
    )


@contextlib.asynccontextmanager
async def _managed(settings: ServeSettings, store: Store) -> AsyncIterator[ManagedServer | None]:
    if settings.llama_server is None:
        yield None
        return
    config = ManagedServerConfig(
        binary=settings.llama_server,
        args=tuple(settings.llama_args),
        embedding_dir=store.path / "segments",
        log_path=store.path / "llama-server.log",
    )
    server = ManagedServer(config)
    log.info("starting llama-server (log: %s)", config.log_path)
    try:
        await server.start()
    except ManagedStartError as e:
        why = e.last_error()
        raise StartupError(
            f"{e.summary}{f': {why}' if why else ''}",
            f"its whole output is in {config.log_path}",
            # as llama-server alone would: whoever watches the process (a supervisor, a test)
            # sees it end with llama-server's own status
            code=e.exit_status,
        ) from e
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_proxy(settings: ServeSettings) -> AsyncIterator[tuple[str, Proxy]]:
    """Everything started; yields the proxy's URL. Stops everything on exit.

    The address is taken first: a port in use fails at once, before a managed llama-server
    spends minutes loading its model only to be stopped again."""
    sockets = bind_listeners(settings.hosts, settings.port)
    with contextlib.ExitStack() as closing:
        for sock in sockets:
            closing.callback(sock.close)  # whatever fails below (running_site closes them too)
        async with _proxy_parts(settings, sockets) as running:
            yield running


@contextlib.asynccontextmanager
async def _proxy_parts(
    settings: ServeSettings, sockets: list[socket.socket]
) -> AsyncIterator[tuple[str, Proxy]]:
    store = _open_store(settings)
    try:
        async with (
            _managed(settings, store) as managed,
            MediaLoader(fetch_policy(settings)) as media,
            _shared(settings) as shared,
            _local_encoder(settings) as encoder,
        ):
            upstream = Upstream(
                managed.base_url if managed else str(settings.upstream),
                encode_timeout_s=settings.upstream_idle_s,
            )
            metrics = Metrics()
            metrics.watch_shared(shared.stats)
            metrics.watch_packages(lambda: upstream.last_capabilities)
            transport = settings.transport
            lookup = PackageLookup(
                store,
                upstream,
                media,
                metrics,
                transport=transport,
                shared=shared,
                encoder=encoder,
                admission=Admission(settings.admit_min_encode_ms),
            )
            proxy = Proxy(
                upstream,
                lookup,
                store,
                metrics,
                Limits(settings.max_body_mb * MIB, settings.max_images, settings.upstream_idle_s),
                settings.api_key.get_secret_value() if settings.api_key else None,
                settings.accept_client_packages,
                _managed_state(managed),
                ResultCache(
                    store,
                    lookup.run,
                    default_on=settings.result_cache,
                    ttl_s=settings.result_ttl_h * 3600,
                ),
                settings.embedding_upstream,
            )
            if managed is not None:
                managed.add_restart_listener(_rebase(upstream, managed))
            try:
                app = create_app(proxy)
                async with running_site(app, settings.hosts, settings.port, sockets=sockets) as url:
                    log.info(
                        "vcache %s listening on %s, upstream %s, packages by %s",
                        VERSION,
                        url,
                        upstream.base_url,
                        transport,
                    )
                    # says loudly, once, if packages are off: beside serving, not before it (an
                    # upstream that does not answer must not hold up the proxy's start)
                    first_look = asyncio.create_task(upstream.capabilities())
                    try:
                        yield url, proxy
                    finally:
                        first_look.cancel()
                        await asyncio.gather(first_look, return_exceptions=True)
            finally:
                await upstream.aclose()
                lookup.close()
    finally:
        store.close()


def _open_store(settings: ServeSettings) -> Store:
    try:
        return Store.open(
            settings.store,
            hot_bytes=settings.hot_mb * MIB,
            disk_bytes=int(settings.disk_gb * 1024 * MIB),
        )
    except (VisionCacheError, OSError) as e:
        raise StartupError(
            f"cannot open the store at {settings.store}: {e}",
            "give --store a directory this user can write (it is created if missing)",
        ) from e


@contextlib.asynccontextmanager
async def _local_encoder(settings: ServeSettings) -> AsyncIterator[LocalEncoder | None]:
    """Encoder worker processes when they encode (see ServeSettings.resolved_encoder), else
    None: upstream's /vision/embedding encodes. Said at startup, either way."""
    if settings.resolved_encoder != "local":
        log.info(
            "encoder: llama-server, which exports a miss's package as it encodes it for the "
            "request (requests wait while it encodes, as without vcache; --encoder local "
            "moves encodes into worker processes)"
        )
        yield None
        return
    from proxy.lookup.local_encoder import LocalEncoder, LocalEncoderConfig
    from vision_cache.llama.mtmd import EncoderSettings

    assert settings.encoder_mmproj is not None and settings.encoder_model is not None
    config = LocalEncoderConfig(
        mmproj=settings.encoder_mmproj,
        text_model=settings.encoder_model,
        lib_dir=settings.lib_dir,
        workers=settings.encoder_workers,
        timeout_s=settings.encoder_timeout_s,
        settings=EncoderSettings(n_threads=settings.encoder_threads, use_gpu=settings.encoder_gpu),
    )
    encoder = LocalEncoder(config)
    try:
        await encoder.start()
    except (UpstreamError, OSError) as e:
        await encoder.aclose()
        if settings.encoder == "local":
            raise
        log.warning("encoder: the local encoder did not start (%s); llama-server encodes", e)
        yield None
        return
    log.info(
        "encoder: %d local worker process(es) for %s (llama-server only decodes "
        "packages; --encoder server to have it encode)",
        config.workers,
        config.mmproj,
    )
    try:
        yield encoder
    finally:
        await encoder.aclose()


@contextlib.asynccontextmanager
async def _shared(settings: ServeSettings) -> AsyncIterator[SharedTier]:
    """The fleet's shared tier (a null one when off); it connects on first use."""
    tier = shared_tier(settings.shared_config)
    log.info("shared tier: %s", tier.describe())
    try:
        yield tier
    finally:
        await tier.aclose()


def _rebase(upstream: Upstream, managed: ManagedServer) -> Callable[[], Any]:
    async def on_restart() -> None:
        log.warning("llama-server restarted (restart #%d)", managed.restarts)
        upstream.rebase(managed.base_url)

    return on_restart


def _managed_state(managed: ManagedServer | None) -> Callable[[], ManagedState] | None:
    if managed is None:
        return None
    return lambda: ManagedState(healthy=managed.healthy, restarts=managed.restarts, pid=managed.pid)


def raise_open_file_limit(target: int = 65536) -> int:
    """Raise this process's soft limit on open files towards the hard one; returns the new one.

    Each payload mapping the hot tier keeps holds a file descriptor (up to 1024 of them),
    beside every client and upstream connection: under load the usual soft limit of 1024 ran
    out (EMFILE: accepts failed, /vcache/health answered 500). The hard limit is the
    operator's to set; the soft one is ours to use up to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def run(settings: ServeSettings) -> None:
    """`serve` on a fresh event loop: uvloop's where it is installed.

    uvloop's loop runs the proxy's own work per relayed request in about two thirds of the
    CPU time of asyncio's (0.65 against 0.93-1.0 ms, measured on a text request against an
    upstream that answers at once), which is most of what the proxy adds to a request."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # not on this platform: asyncio's own loop
        return None
    return uvloop.new_event_loop


async def serve(settings: ServeSettings) -> None:
    """Run until SIGINT or SIGTERM."""
    log.debug("open files: up to %d", raise_open_file_limit())
    if settings.backend == "llama-cpp-python":
        from proxy.backends.llama_cpp import running_backend

        backend = llama_cpp_settings(settings)
        what = f"{backend.model.name} with llama-cpp-python"
        await run_until_signalled(running_backend(backend), what)
    else:
        await run_until_signalled(running_proxy(settings))
