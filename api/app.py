"""The FastAPI application, built by `create_app` from settings (lake, service limits, auth).

Routers by concern: TAP sync, TAP async (UWS), VOSI + examples, SCS, health, `/metrics` (api/metrics.py;
every query also gets a line in the query log, api/querylog.py). `dac serve` runs it under
uvicorn; tests start it the same way on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api import metrics, querylog
from api.auth import Authenticator, AuthError, AuthSettings, identity_dependency
from api.config import ServiceSettings
from api.formats import TapError
from api.routers.alerts import make_alerts_router
from api.routers.broker import make_broker_router
from api.routers.common import error_response
from api.routers.scs import make_scs_router
from api.routers.tap_sync import make_sync_router
from api.routers.vosi import make_vosi_router
from api.service import DacService
from dac_lake.lake import Lake
from dac_lake.settings import Settings, load_settings
from dac_lake.storage import LakeStorage

log = logging.getLogger("api")


def create_app(
    settings: Settings | None = None,
    service_settings: ServiceSettings | None = None,
    auth_settings: AuthSettings | None = None,
) -> FastAPI:
    """The service for the configured lake (`DAC_LAKE_URL` / the config file), or for explicit settings."""
    _setup_logging()
    settings = settings or load_settings()
    service_settings = service_settings or ServiceSettings.from_settings(settings)
    auth_settings = auth_settings or AuthSettings.from_mapping(
        settings.sections.get("auth") or {}, os.environ
    )
    lake = Lake(LakeStorage(settings.lake_url, settings))
    lake.check()
    querylog.configure(service_settings.query_log, service_settings.query_log_max_chars)
    service = DacService(lake, service_settings)
    authenticator = Authenticator(auth_settings)
    identity = identity_dependency(authenticator)

    from api.async_jobs import make_async_jobs

    jobs = make_async_jobs(service, identity, Path(service_settings.job_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs.start()
        log.info("dac-lake service on lake %s; jobs in %s", lake.storage.url, service_settings.job_dir)
        try:
            yield
        finally:
            jobs.stop()
            service.close()
            metrics.process_exit()

    app = FastAPI(
        title=service_settings.title,
        description=service_settings.description,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.authenticator = authenticator
    app.state.jobs = jobs

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> Response:
        response = error_response(TapError(exc.message, exc.http_status))
        for challenge in exc.www_authenticate:
            response.headers.append("WWW-Authenticate", challenge)
        return response

    @app.exception_handler(TapError)
    async def tap_error(request: Request, exc: TapError) -> Response:
        return error_response(exc)

    app.include_router(make_sync_router(service, identity))
    app.include_router(jobs.router)
    app.include_router(make_vosi_router(service, identity))
    app.include_router(make_scs_router(service, identity))
    app.include_router(make_alerts_router(service, identity))
    app.include_router(make_broker_router(service, identity))
    metrics.install(app, jobs.store.path)  # /metrics and the per-request counters

    @app.get("/health", summary="liveness and lake reachability")
    async def health() -> Response:
        try:
            service.lake.check()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)[:200]}, status_code=503)
        return JSONResponse({"status": "ok", "lake": lake.storage.url})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/tap", response_class=HTMLResponse, include_in_schema=False)
    async def home(request: Request) -> str:
        base = (service_settings.public_url or str(request.base_url)).rstrip("/")
        return _HOME.format(title=service_settings.title, tap=f"{base}/tap", base=base)

    return app


def _setup_logging() -> None:
    """Our loggers at INFO with time and level, in every worker process (uvicorn configures only its own):
    the per-query log line (who, what, rows, files, seconds) is the service's audit trail."""
    ours = logging.getLogger("api")
    if any(getattr(h, "_dac", False) for h in ours.handlers):
        return
    handler = logging.StreamHandler()
    handler._dac = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("api", "dac_lake"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


_HOME = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title></head><body>
<h1>{title}</h1>
<p>An IVOA TAP 1.1 service. In TOPCAT: <em>VO &gt; Table Access Protocol (TAP) Query</em>, enter
<code>{tap}</code>. In Python:
<code>pyvo.dal.TAPService("{tap}").search("SELECT TOP 10 * FROM TAP_SCHEMA.tables")</code>.</p>
<ul>
<li><a href="{tap}/tables">tables</a> · <a href="{tap}/capabilities">capabilities</a> ·
<a href="{tap}/availability">availability</a> · <a href="{tap}/examples">examples</a> ·
<a href="{tap}/async">async jobs</a></li>
<li>Simple Cone Search: <code>{base}/scs/&lt;catalog&gt;?RA=..&amp;DEC=..&amp;SR=..</code></li>
<li>Alert objects: <code>{base}/alerts/&lt;stream&gt;/objects</code></li>
<li><a href="{base}/docs">OpenAPI</a> · <a href="{base}/health">health</a></li>
</ul></body></html>
"""
