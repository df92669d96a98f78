"""The service app with the alert broker's routes, for the broker API tests, until `api.app.create_app`
includes them itself: `uvicorn tests.broker_app:create_app --factory` (lake, config and job folder from
`DAC_LAKE_URL`, `DAC_CONFIG`, `DAC_SERVICE_JOB_DIR`, as `dac serve` hands them over)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app as create_service_app
from api.auth import identity_dependency
from api.routers.broker import make_broker_router

BROKER_ROUTE = "/alerts/{stream}/filters"


def create_app() -> FastAPI:
    app = create_service_app()
    if not any(getattr(route, "path", None) == BROKER_ROUTE for route in app.routes):
        identity = identity_dependency(app.state.authenticator)
        app.include_router(make_broker_router(app.state.service, identity))
    return app
