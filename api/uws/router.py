"""The UWS 1.1 REST binding (TAP /async) as a FastAPI router.

Resource tree under `base_path` (default /tap/async):

    GET    /                       job list (PHASE repeatable, AFTER, LAST)          uws:jobs
    POST   /                       create a job from the form (PHASE=RUN starts it)  303 -> job
    GET    /{id}                   the job; WAIT=n[&PHASE=p] blocks for a change     uws:job
    DELETE /{id}  | POST /{id} ACTION=DELETE                                         303 -> job list
    POST   /{id}                   other parameters: set job parameters (PENDING)    303 -> job
    GET|POST /{id}/phase           RUN, ABORT                                        text | 303
    GET|POST /{id}/executionduration, /{id}/destruction                              text | 303
    GET    /{id}/error             the error document (executor's file, else the message)
    GET    /{id}/quote, /{id}/owner                                                  text
    GET|POST /{id}/parameters      uws:parameters | set parameters (PENDING)         303 -> job
    GET|POST /{id}/parameters/{name}                                                 text | 303
    GET    /{id}/results           uws:results
    GET    /{id}/results/{rid}     the result file ("result" is TAP's main result)

Jobs are private: a job of another caller answers 404 exactly like a job that does not exist, so job ids
of others cannot even be confirmed. Blocking WAIT is awaited on the event loop (an asyncio.Event woken by
the store's change listener, plus a poll of the database for changes made by other processes), so a
thousand waiting clients hold no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.uws.runner import JobRunner
from api.uws.store import (
    ACTIVE_PHASES,
    NOT_STARTED_PHASES,
    InvalidPhase,
    Job,
    JobNotFound,
    JobStore,
    Parameters,
    Phase,
    Upload,
    UWSError,
    parse_iso8601,
)
from api.uws.xml import (
    MEDIA_TYPE,
    format_datetime,
    render_job,
    render_job_list,
    render_parameters,
    render_results,
)

log = logging.getLogger(__name__)

#: UWS parameters that control the job rather than being job parameters
RESERVED = frozenset({"phase", "runid", "executionduration", "destruction"})

ErrorRenderer = Callable[[str, int], Response]


# --------------------------------------------------------------------------------------------- waiting
class _PhaseWaiters:
    """Wakes WAIT requests of this process when the store reports a change of their job.

    The store calls `changed` from whatever thread made the change; each waiter's asyncio.Event is set on
    its own loop through `call_soon_threadsafe`."""

    def __init__(self, store: JobStore):
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        store.add_listener(self.changed)

    def changed(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its request is gone
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set on every change of the job, for as long as the `with` block lasts.

        Subscribe *before* reading the job's phase: a change between the read and the wait then still
        sets the event, so no wake-up is lost."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]


# --------------------------------------------------------------------------------------------- requests
@dataclass
class _Form:
    """A UWS request's parameters, split into UWS controls and job parameters."""

    params: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, UploadFile] = field(default_factory=dict)
    phase: str | None = None
    run_id: str | None = None
    execution_duration: int | None = None
    destruction: datetime | None = None
    action: str | None = None


def _query_values(request: Request, name: str) -> list[str]:
    key = name.lower()
    return [v for k, v in request.query_params.multi_items() if k.lower() == key]


def _split(items: list[tuple[str, Any]], *, action: bool = False) -> _Form:
    form = _Form()
    for name, value in items:
        if isinstance(value, UploadFile):
            form.files[name] = value
            continue
        key = name.lower()
        if key == "phase":
            form.phase = value.strip().upper()
        elif key == "runid":
            form.run_id = value
        elif key == "executionduration":
            try:
                form.execution_duration = int(value.strip())
            except ValueError:
                raise UWSError(
                    f"EXECUTIONDURATION must be a whole number of seconds, not {value!r}"
                ) from None
        elif key == "destruction":
            form.destruction = parse_iso8601(value)
        elif action and key == "action":
            form.action = value.strip().upper()
        else:
            form.params.append((name, value))
    return form


def _parse_upload(values: list[str]) -> list[tuple[str, str]]:
    """TAP UPLOAD values -> (table, URI) pairs: `UPLOAD=t1,param:part1;t2,https://host/t.xml`."""
    pairs = []
    for value in values:
        for item in value.split(";"):
            if not item.strip():
                continue
            table, sep, uri = item.partition(",")
            if not sep or not table.strip() or not uri.strip():
                raise UWSError(
                    f"UPLOAD must be table-name,URI pairs separated by ';' (e.g. UPLOAD=mine,param:file1), "
                    f"not {item.strip()!r}"
                )
            pairs.append((table.strip(), uri.strip()))
    return pairs


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _plan_uploads(params: list[tuple[str, str]], files: dict[str, UploadFile],
                  taken: set[str]) -> list[tuple[Upload, UploadFile | None]]:
    """Match UPLOAD references to the request's file parts and choose where each part is saved.

    Every part is kept (even one no UPLOAD names: the executor may want it); a `param:` reference to a
    part the request lacks is the client's error."""
    by_lower = {name.lower(): name for name in files}
    saved: dict[str, str] = {}  # part name -> relative path

    def place(part: str) -> str:
        if part not in saved:
            base = _UNSAFE.sub("_", part).strip("._")[:80] or "upload"
            name, n = base, 1
            while name.lower() in taken:
                n += 1
                name = f"{base}_{n}"
            taken.add(name.lower())
            saved[part] = f"uploads/{name}"
        return saved[part]

    planned: list[tuple[Upload, UploadFile | None]] = []
    for table, uri in _parse_upload([v for n, v in params if n.lower() == "upload"]):
        if uri.lower().startswith("param:"):
            wanted = uri[len("param:"):]
            part = wanted if wanted in files else by_lower.get(wanted.lower())
            if part is None:
                raise UWSError(f"UPLOAD {table} refers to {uri} but the request has no file part named "
                               f"{wanted!r}")
            planned.append((Upload(table=table, source=uri, path=place(part)), files[part]))
        else:
            planned.append((Upload(table=table, source=uri, path=None), None))
    for part, upload_file in files.items():
        if part not in saved:
            planned.append((Upload(table=None, source=f"param:{part}", path=place(part)), upload_file))
    return planned


def _save_uploads(job_dir: Path, planned: list[tuple[Upload, UploadFile | None]],
                  max_bytes: int | None = None) -> None:
    """Copy the request's file parts into the job folder; refuse (413) past `max_bytes` in all."""
    done: set[str] = set()
    total = 0
    for upload, source in planned:
        if source is None or upload.path is None or upload.path in done:
            continue
        done.add(upload.path)
        source.file.seek(0)
        with open(job_dir / upload.path, "wb") as out:
            while chunk := source.file.read(1024 * 1024):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise UWSError(f"the uploaded files exceed the limit of {max_bytes} bytes", 413)
                out.write(chunk)


# --------------------------------------------------------------------------------------------- router
def make_async_router(
    store: JobStore,
    runner: JobRunner,
    *,
    identity_dependency: Callable[..., Any],
    base_path: str = "/tap/async",
    job_params_validator: Callable[[Parameters], None] | None = None,
    error_renderer: ErrorRenderer | None = None,
    max_wait: float = 60.0,
    wait_poll_interval: float = 1.0,
    list_anonymous_jobs: bool = True,
    accumulate_parameters: tuple[str, ...] = ("UPLOAD",),
    max_upload_bytes: int | None = None,
) -> APIRouter:
    """The UWS 1.1 resource tree for `store`'s jobs, run by `runner`.

    `identity_dependency` is a FastAPI dependency returning an object with `.name` (None = anonymous).
    `job_params_validator(params)` may raise an exception with `http_status` and `message` to refuse a
    job at creation or a parameter change (e.g. a missing QUERY); `error_renderer(message, status)` makes
    the error responses (e.g. DALI error VOTables) — plain text without it. `max_wait` caps blocking WAIT
    (WAIT=-1 means that cap). `list_anonymous_jobs=False` shows anonymous callers an empty job list (their
    jobs stay reachable by URL): with it True, every anonymous caller sees every anonymous job id.
    Parameters named in `accumulate_parameters` add to earlier values on update instead of replacing
    them (TAP UPLOAD: each POST adds tables). `max_upload_bytes` caps the files of one request (413).
    """
    base_path = "/" + base_path.strip("/")
    router = APIRouter()
    caller = Depends(identity_dependency)  # one dependency object, reused by every endpoint
    waiters = _PhaseWaiters(store)
    accumulate = tuple(a.lower() for a in accumulate_parameters)

    def error_response(message: str, status: int) -> Response:
        if error_renderer is not None:
            return error_renderer(message, status)
        return PlainTextResponse(message, status_code=status)

    def guarded(fn):
        """UWSError (and validator errors) -> an error response; anything else is a real 500."""

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                return await fn(*args, **kwargs)
            except UWSError as exc:
                return error_response(exc.message, exc.http_status)

        return wrapper

    def validate(params: Parameters) -> None:
        if job_params_validator is None:
            return
        try:
            job_params_validator(params)
        except UWSError:
            raise
        except Exception as exc:
            status = getattr(exc, "http_status", None)
            if not isinstance(status, int):
                raise
            raise UWSError(str(getattr(exc, "message", None) or exc), status) from exc

    def list_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + base_path

    def job_url(request: Request, job_id: str) -> str:
        return f"{list_url(request)}/{job_id}"

    def see_job(request: Request, job_id: str) -> Response:
        return RedirectResponse(job_url(request, job_id), status_code=303)

    def owner_of(identity: Any) -> str | None:
        return getattr(identity, "name", None)

    async def get_job(job_id: str, owner: str | None) -> Job:
        return await run_in_threadpool(store.require, job_id, owner)

    def xml(text: str) -> Response:
        return Response(text, media_type=MEDIA_TYPE)

    async def read_form(request: Request, *, action: bool = False) -> tuple[_Form, Any]:
        """Query-string and body parameters (urlencoded or multipart); the caller closes the form."""
        form = await request.form()
        items: list[tuple[str, Any]] = list(request.query_params.multi_items())
        items.extend(form.multi_items())
        return _split(items, action=action), form

    async def apply_controls(request: Request, job_id: str, owner: str | None, form: _Form) -> None:
        """EXECUTIONDURATION, DESTRUCTION and PHASE given along with parameters."""
        if form.execution_duration is not None:
            seconds = runner.clamp_execution_duration(form.execution_duration)
            await run_in_threadpool(store.set_execution_duration, job_id, owner, seconds)
        if form.destruction is not None:
            when = runner.clamp_destruction(form.destruction)
            await run_in_threadpool(store.set_destruction, job_id, owner, when)
        if form.phase is not None:
            await change_phase(job_id, owner, form.phase)

    async def change_phase(job_id: str, owner: str | None, phase: str) -> None:
        if phase == "RUN":
            await run_in_threadpool(runner.run, job_id, owner)
        elif phase == "ABORT":
            await run_in_threadpool(runner.abort, job_id, owner)
        else:
            raise UWSError(f"PHASE must be RUN or ABORT, not {phase!r}")

    async def update_parameters(request: Request, job_id: str, owner: str | None, form: _Form) -> None:
        job = await get_job(job_id, owner)
        if form.params or form.files or form.run_id is not None:
            if job.phase not in NOT_STARTED_PHASES:
                raise InvalidPhase(
                    f"the job is {job.phase}: its parameters can only be changed while it is PENDING"
                )
            validate(job.parameters.updated(form.params, accumulate))
            taken = {Path(u.path).name.lower() for u in job.uploads if u.path}
            planned = _plan_uploads(form.params, form.files, taken)
            # save first: the files are only referenced once the update (which checks PENDING) commits
            await run_in_threadpool(_save_uploads, job.job_dir, planned, max_upload_bytes)
            await run_in_threadpool(
                functools.partial(store.update_parameters, job_id, owner, form.params,
                                  uploads=[u for u, _ in planned], accumulate=accumulate,
                                  run_id=form.run_id)
            )
        await apply_controls(request, job_id, owner, form)

    # ------------------------------------------------------------------------------- job list
    @router.get(base_path)
    @guarded
    async def list_jobs(request: Request, identity=caller) -> Response:
        try:
            phases = [Phase(p.strip().upper()) for p in _query_values(request, "PHASE")]
        except ValueError:
            raise UWSError(f"PHASE must be one of {', '.join(p.value for p in Phase)}") from None
        after_values = _query_values(request, "AFTER")
        after = max(parse_iso8601(v) for v in after_values) if after_values else None
        last = None
        last_values = _query_values(request, "LAST")
        if last_values:
            try:
                last = int(last_values[-1])
            except ValueError:
                last = -1
            if last < 0:
                raise UWSError(f"LAST must be a whole number >= 0, not {last_values[-1]!r}")
        owner = owner_of(identity)
        if owner is None and not list_anonymous_jobs:
            jobs: list[Job] = []
        else:
            jobs = await run_in_threadpool(
                functools.partial(store.list, owner, phases=phases or None, after=after, last=last)
            )
        return xml(render_job_list(jobs, list_url(request)))

    @router.post(base_path)
    @guarded
    async def create_job(request: Request, identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request)
        try:
            if form.phase not in (None, "RUN"):
                raise UWSError(f"a job can only be created with PHASE=RUN (or no PHASE), not {form.phase!r}")
            params = Parameters(form.params)
            validate(params)
            planned = _plan_uploads(form.params, form.files, set())
            duration, destruction = runner.new_job_settings()
            if form.execution_duration is not None:
                duration = runner.clamp_execution_duration(form.execution_duration)
            if form.destruction is not None:
                destruction = runner.clamp_destruction(form.destruction)
            job = await run_in_threadpool(
                functools.partial(store.create, owner_id=owner, parameters=params,
                                  uploads=[u for u, _ in planned], run_id=form.run_id,
                                  execution_duration=duration, destruction=destruction)
            )
            try:
                await run_in_threadpool(_save_uploads, job.job_dir, planned, max_upload_bytes)
                if form.phase == "RUN":
                    await run_in_threadpool(runner.run, job.job_id, owner)
            except Exception:
                # creation and start are one request: leave no half-made job behind
                await run_in_threadpool(runner.delete, job.job_id)
                raise
        finally:
            await raw.close()
        return see_job(request, job.job_id)

    # ------------------------------------------------------------------------------- one job
    @router.get(base_path + "/{job_id}")
    @guarded
    async def get_job_document(request: Request, job_id: str,
                               identity=caller) -> Response:
        owner = owner_of(identity)
        job = await get_job(job_id, owner)
        wait_values = _query_values(request, "WAIT")
        if wait_values:
            try:
                wait = float(wait_values[-1])
            except ValueError:
                raise UWSError(f"WAIT must be a number of seconds, not {wait_values[-1]!r}") from None
            wait = max_wait if wait < 0 else min(wait, max_wait)
            phase_values = _query_values(request, "PHASE")
            expected = None
            if phase_values:
                try:
                    expected = Phase(phase_values[-1].strip().upper())
                except ValueError:
                    raise UWSError(f"PHASE must be one of {', '.join(p.value for p in Phase)}") from None
            if job.phase in ACTIVE_PHASES and (expected is None or expected == job.phase):
                job = await wait_for_change(job, owner, wait)
        return xml(render_job(job, job_url(request, job_id)))

    async def wait_for_change(job: Job, owner: str | None, wait: float) -> Job:
        """Block (without holding a thread) until the job leaves the phase the client saw, or `wait` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        seen = job.phase
        with waiters.subscribe(job.job_id) as changed:
            while True:
                job = await get_job(job.job_id, owner)  # JobNotFound if it was deleted meanwhile
                remaining = deadline - loop.time()
                if job.phase != seen or remaining <= 0:
                    return job
                # woken by this process's changes at once; other processes' changes are polled
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, wait_poll_interval))
                changed.clear()

    @router.delete(base_path + "/{job_id}")
    @guarded
    async def delete_job(request: Request, job_id: str, identity=caller) -> Response:
        if not await run_in_threadpool(runner.delete, job_id, owner_of(identity)):
            raise JobNotFound(job_id)
        return RedirectResponse(list_url(request), status_code=303)

    @router.post(base_path + "/{job_id}")
    @guarded
    async def post_job(request: Request, job_id: str, identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request, action=True)
        try:
            if form.action is not None:
                if form.action != "DELETE":
                    raise UWSError(f"ACTION must be DELETE, not {form.action!r}")
                if not await run_in_threadpool(runner.delete, job_id, owner):
                    raise JobNotFound(job_id)
                return RedirectResponse(list_url(request), status_code=303)
            await update_parameters(request, job_id, owner, form)
        finally:
            await raw.close()
        return see_job(request, job_id)

    # ------------------------------------------------------------------------------- phase
    @router.get(base_path + "/{job_id}/phase")
    @guarded
    async def get_phase(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return PlainTextResponse(job.phase.value)

    @router.post(base_path + "/{job_id}/phase")
    @guarded
    async def post_phase(request: Request, job_id: str, identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request)
        await raw.close()
        await get_job(job_id, owner)
        if form.phase is None:
            raise UWSError("PHASE=RUN or PHASE=ABORT is required")
        await change_phase(job_id, owner, form.phase)
        return see_job(request, job_id)

    # ------------------------------------------------------------------------------- duration, destruction
    @router.get(base_path + "/{job_id}/executionduration")
    @guarded
    async def get_duration(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return PlainTextResponse(str(job.execution_duration))

    @router.post(base_path + "/{job_id}/executionduration")
    @guarded
    async def post_duration(request: Request, job_id: str,
                            identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request)
        await raw.close()
        await get_job(job_id, owner)
        if form.execution_duration is None:
            raise UWSError("EXECUTIONDURATION (seconds, 0 = unlimited) is required")
        seconds = runner.clamp_execution_duration(form.execution_duration)
        await run_in_threadpool(store.set_execution_duration, job_id, owner, seconds)
        return see_job(request, job_id)

    @router.get(base_path + "/{job_id}/destruction")
    @guarded
    async def get_destruction(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return PlainTextResponse(format_datetime(job.destruction) if job.destruction else "")

    @router.post(base_path + "/{job_id}/destruction")
    @guarded
    async def post_destruction(request: Request, job_id: str,
                               identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request)
        await raw.close()
        await get_job(job_id, owner)
        if form.destruction is None:
            raise UWSError("DESTRUCTION (an ISO-8601 time such as 2026-01-31T12:00:00Z) is required")
        when = runner.clamp_destruction(form.destruction)
        await run_in_threadpool(store.set_destruction, job_id, owner, when)
        return see_job(request, job_id)

    # ------------------------------------------------------------------------------- error, quote, owner
    @router.get(base_path + "/{job_id}/error")
    @guarded
    async def get_error(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        if job.error is None:
            raise UWSError(f"the job is {job.phase} and has no error", 404)
        if job.error.document:
            path = job.resolve(job.error.document)
            if path.is_file():
                return FileResponse(path, media_type=job.error.mime_type or "application/octet-stream")
        if error_renderer is not None:
            return error_renderer(job.error.message, 200)
        return PlainTextResponse(job.error.message)

    @router.get(base_path + "/{job_id}/quote")
    @guarded
    async def get_quote(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return PlainTextResponse(format_datetime(job.quote) if job.quote else "")

    @router.get(base_path + "/{job_id}/owner")
    @guarded
    async def get_owner(job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return PlainTextResponse(job.owner_id or "")

    # ------------------------------------------------------------------------------- parameters
    @router.get(base_path + "/{job_id}/parameters")
    @guarded
    async def get_parameters(job_id: str, identity=caller) -> Response:
        return xml(render_parameters(await get_job(job_id, owner_of(identity))))

    @router.post(base_path + "/{job_id}/parameters")
    @guarded
    async def post_parameters(request: Request, job_id: str,
                              identity=caller) -> Response:
        owner = owner_of(identity)
        form, raw = await read_form(request)
        try:
            await update_parameters(request, job_id, owner, form)
        finally:
            await raw.close()
        return see_job(request, job_id)

    @router.get(base_path + "/{job_id}/parameters/{name}")
    @guarded
    async def get_parameter(job_id: str, name: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        if name.lower() == "runid" and job.run_id is not None:
            return PlainTextResponse(job.run_id)
        values = job.parameters.getall(name)
        if not values:
            raise UWSError(f"the job has no parameter {name!r}", 404)
        return PlainTextResponse("\n".join(values))

    @router.post(base_path + "/{job_id}/parameters/{name}")
    @guarded
    async def post_parameter(request: Request, job_id: str, name: str,
                             identity=caller) -> Response:
        """The value comes from a form field named like the parameter (or VALUE), else the raw body."""
        owner = owner_of(identity)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            async with request.form() as raw:
                items = [(k, v) for k, v in raw.multi_items() if isinstance(v, str)]
            values = [v for k, v in items if k.lower() == name.lower()] or \
                     [v for k, v in items if k.lower() == "value"]
        else:
            values = [(await request.body()).decode("utf-8", errors="replace")]
        if not values:
            raise UWSError(f"give the new value as {name}=... (or VALUE=...)")
        form = _split([(name, v) for v in values])
        await update_parameters(request, job_id, owner, form)
        return see_job(request, job_id)

    # ------------------------------------------------------------------------------- results
    @router.get(base_path + "/{job_id}/results")
    @guarded
    async def get_results(request: Request, job_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        return xml(render_results(job, job_url(request, job_id)))

    @router.get(base_path + "/{job_id}/results/{result_id}")
    @guarded
    async def get_result(job_id: str, result_id: str, identity=caller) -> Response:
        job = await get_job(job_id, owner_of(identity))
        result = job.result(result_id)
        if result is None:
            raise UWSError(f"the job ({job.phase}) has no result {result_id!r}", 404)
        if result.path is None:
            return RedirectResponse(result.href or "", status_code=303)
        path = job.resolve(result.path).resolve()
        if not path.is_relative_to(job.job_dir.resolve()) or not path.is_file():
            raise UWSError(f"the file of result {result_id!r} is gone", 404)
        return FileResponse(path, media_type=result.mime_type)

    return router
