"""IVOA UWS 1.1 asynchronous jobs for the TAP service: store, runner, XML documents and the REST router.

Wiring (see router.py for the resource tree):

    store = JobStore(state_dir / "uws.sqlite")               # shared by all worker processes of a host
    runner = JobRunner(store, executor, workers=4).start()   # executor(job, ctx) -> list[JobResult]
    app.include_router(make_async_router(store, runner, identity_dependency=current_identity))
    ... on shutdown: runner.stop(); store.close()
"""

from api.uws.router import make_async_router
from api.uws.runner import JobContext, JobExecutor, JobRunner
from api.uws.store import (
    ACTIVE_PHASES,
    ANY_OWNER,
    FINAL_PHASES,
    RESTART_MESSAGE,
    ErrorSummary,
    InvalidPhase,
    Job,
    JobNotFound,
    JobResult,
    JobStore,
    Parameters,
    Phase,
    Upload,
    UWSError,
)

__all__ = [
    "ACTIVE_PHASES",
    "ANY_OWNER",
    "FINAL_PHASES",
    "RESTART_MESSAGE",
    "ErrorSummary",
    "InvalidPhase",
    "Job",
    "JobContext",
    "JobExecutor",
    "JobNotFound",
    "JobResult",
    "JobRunner",
    "JobStore",
    "Parameters",
    "Phase",
    "UWSError",
    "Upload",
    "make_async_router",
]
