"""`transaction` probe: ordered HTTP steps that carry values from one answer into the next request, may poll until
a condition holds, and always clean up after themselves.

The shipped web-form canary: submit a synthetic ticket → poll it until the AI agent has replied (the 15 s
promise) → delete it. Cleanup steps run after a pass, after a failure, after a timeout and when the daemon stops
mid-run, shielded from the run's cancellation and bounded by `cleanup_timeout` (see `probes/cleanup.py`), so a
canary never leaves a ticket behind; a run therefore lasts at most `timeout + cleanup_timeout`. A failed cleanup
is reported on its own (reason `cleanup`).

What a `kill -9` would leave behind is covered too: the moment a step extracts a value a cleanup step needs (the
ticket id), the run records it in the object ledger (canary/ledger.py), and settles the entry once its cleanup
removed the ticket; the janitor (canary/janitor.py) removes leftovers later through `remove_leftover`, with the
current config's cleanup steps. Only the values the cleanup steps use are recorded, never one a secret-named header
carries. An optional `sweep` lists the platform's tickets, picks the synthetic ones by their marker and age, and
hands their ids to the same cleanup steps (`find_leftovers`).

Each run has its own cookie jar, pinned to the platform's origin, so a login step's session cookie reaches the
later steps (a login → form with a CSRF token → submit flow) but never another server or the next run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Literal, Mapping
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from canary.contract import (
    SECRET_NAME, USER_AGENT, Check, Duration, LowerName, PhaseTimer, Probe, ProbeSettings, Result, Scrubber,
    SyntheticHeader, format_duration, marker_headers,
)
from probes.cleanup import ShieldedCleanups
from probes.conditions import Condition, parse_condition
from probes.transport import (
    ExpectedStatuses, client_error_result, client_tls_context, http_url, new_session, OriginCookieJar, read_limited,
    RedirectRefused, request_following_redirects, secret_headers, status_matches, transient_wait, Url, url_for_humans,
    without_credentials,
)
from probes.jsonpath import is_missing, lookup, parse_path

log = logging.getLogger("probes.transaction")
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
BUILTIN_VARIABLES = ("run_id", "timestamp")


class Poll(BaseModel):
    """Repeat the step every `every` until its checks pass, for at most `within` (the SLA being measured)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    every: Duration = 1.0
    within: Duration


def _conditions(conditions: list[str]) -> list[str]:
    for condition in conditions:
        parse_condition(condition)
    return conditions


def _extractions(extract: dict[str, str]) -> dict[str, str]:
    """Variables a step or the sweep extracts: plain names that do not shadow a built-in one, valid paths."""
    for variable, path in extract.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", variable):
            raise ValueError(f"variable name {variable!r} must be lower-case letters, digits and _")
        if variable in BUILTIN_VARIABLES:
            raise ValueError(f"variable name {variable!r} is built in")
        parse_path(path)
    return extract


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    name: LowerName
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    body_json: Any = Field(default=None, alias="json")
    form: dict[str, str] | None = None
    expect_status: ExpectedStatuses = Field(default_factory=lambda: ["2xx"])
    expect: list[str] = Field(default_factory=list)
    extract: dict[str, str] = Field(default_factory=dict)
    poll: Poll | None = None
    max_body_bytes: int = Field(default=1_048_576, gt=0)

    _valid_conditions = field_validator("expect")(lambda cls, conditions: _conditions(conditions))
    _valid_extract = field_validator("extract")(lambda cls, extract: _extractions(extract))

    @model_validator(mode="after")
    def _one_body(self) -> "Step":
        given = [k for k, v in (("body", self.body), ("json", self.body_json), ("form", self.form)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of body, json and form (got {', '.join(given)})")
        return self

    def variables_used(self) -> set[str]:
        return set(_VARIABLE.findall(json.dumps([self.url, self.headers, self.body, self.body_json, self.form])))


class Sweep(BaseModel):
    """Find synthetic tickets on the platform that no ledger knows of (a run killed between its submit and the
    answer): GET a listing, take the items at `items`, keep those every `match` condition holds for and whose
    `created` time is older than `min_age`, and run the cleanup steps with each one's `extract`ed values."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    expect_status: ExpectedStatuses = Field(default_factory=lambda: ["2xx"])
    max_body_bytes: int = Field(default=4_194_304, gt=0)
    items: str
    match: list[str] = Field(min_length=1)
    created: str
    extract: dict[str, str] = Field(min_length=1)
    every: Duration = 600.0
    # Younger synthetic tickets may belong to a run in flight (of this process, or of another replica or shard).
    min_age: Duration = 600.0

    @field_validator("items", "created")
    @classmethod
    def _valid_path(cls, path: str) -> str:
        parse_path(path)
        return path

    _valid_conditions = field_validator("match")(lambda cls, conditions: _conditions(conditions))
    _valid_extract = field_validator("extract")(lambda cls, extract: _extractions(extract))

    def as_step(self) -> Step:
        return Step(name="sweep", url=self.url, headers=self.headers, expect_status=self.expect_status,
                    max_body_bytes=self.max_body_bytes)


class TransactionSettings(ProbeSettings):
    type: Literal["transaction"] = "transaction"
    base_url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    synthetic_header: SyntheticHeader = "X-Synthetic-Canary: 1"
    verify_tls: bool = True
    steps: list[Step] = Field(min_length=1)
    cleanup: list[Step] = Field(default_factory=list)
    cleanup_timeout: Duration = 5.0
    sweep: Sweep | None = None

    @field_validator("base_url")
    @classmethod
    def _valid_base(cls, url: str) -> str:
        return http_url(url.rstrip("/")) if url else url

    @model_validator(mode="after")
    def _consistent(self) -> "TransactionSettings":
        names = [step.name for step in [*self.steps, *self.cleanup]]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"step names must be unique (repeated: {', '.join(repeated)})")
        known = set(BUILTIN_VARIABLES)
        for step in self.steps:
            unknown = step.variables_used() - known
            if unknown:
                raise ValueError(
                    f"step {step.name!r} uses {', '.join(sorted(unknown))} before any earlier step extracts it"
                )
            known |= set(step.extract)
        for step in self.cleanup:
            unknown = step.variables_used() - known
            if unknown:
                raise ValueError(f"cleanup step {step.name!r} uses {', '.join(sorted(unknown))}, which no step extracts")
        for step in [*self.steps, *self.cleanup]:
            if not self.base_url and not URL(_VARIABLE.sub("x", step.url)).is_absolute():
                raise ValueError(f"step {step.name!r} has a relative url but no base_url is set")
        if self.sweep is not None:
            self._check_sweep(self.sweep)
        return self

    def _check_sweep(self, sweep: Sweep) -> None:
        if not self.cleanup:
            raise ValueError("sweep needs cleanup steps: they remove what it finds")
        needed = {variable for step in self.cleanup for variable in step.variables_used()}
        if needed - set(sweep.extract):
            raise ValueError(f"sweep.extract must give every value the cleanup steps use (missing: "
                             f"{', '.join(sorted(needed - set(sweep.extract)))})")
        if sweep.as_step().variables_used() - {"timestamp"}:
            raise ValueError("sweep.url and sweep.headers may use no variable but {timestamp}")
        if not self.base_url and not URL(sweep.url).is_absolute():
            raise ValueError("sweep has a relative url but no base_url is set")

    def check_timing(self, timeout: float, inherited_from: str | None) -> str | None:
        if self.sweep is not None and self.sweep.min_age < timeout + self.cleanup_timeout:
            return (f"sweep.min_age: {format_duration(self.sweep.min_age)} is shorter than a run may last (timeout "
                    f"{format_duration(timeout)} + cleanup_timeout {format_duration(self.cleanup_timeout)}): it could "
                    "delete the ticket of a run in flight")
        return None

    def leaves_objects(self) -> bool:
        return bool(self.cleanup)

    def sweep_interval(self) -> float | None:
        return self.sweep.every if self.sweep is not None else None

    def cookie_origin(self) -> str:
        """The one origin a run keeps cookies for: base_url's, or the first step's when every URL is absolute."""
        return self.base_url or _VARIABLE.sub("x", self.steps[0].url)

    def cleanup_bound(self) -> float:
        return self.cleanup_timeout if self.cleanup else 0.0

    def target(self) -> str:
        first = self.steps[0]
        return f"{len(self.steps)} steps from {first.method} {url_for_humans(self.base_url + first.url)}"

    def secret_values(self) -> list[str]:
        found = super().secret_values()
        for headers in [self.headers, *(step.headers for step in [*self.steps, *self.cleanup])]:
            found += secret_headers(headers)
        if self.sweep is not None:
            found += secret_headers(self.sweep.headers) + Url(self.sweep.url).secret_parts()
        for step in [*self.steps, *self.cleanup]:  # a login form's password
            found += secret_headers(step.form or {})
        for step in [*self.steps, *self.cleanup]:  # an absolute step URL may carry credentials of its own
            found += Url(step.url).secret_parts()
        return found


class _StepFailed(Exception):
    def __init__(self, result: Result) -> None:
        self.result = result


class TransactionProbe(Probe[TransactionSettings]):
    settings_model = TransactionSettings
    reasons = ("status", "tls", "dns", "connect", "body", "redirect", "assertion", "slow", "cleanup")

    def __init__(self, settings: TransactionSettings) -> None:
        super().__init__(settings)
        self._conditions = {step.name: [parse_condition(c) for c in step.expect] for step in [*settings.steps, *settings.cleanup]}
        self._extracts = {step.name: {v: parse_path(p) for v, p in step.extract.items()} for step in settings.steps}
        self._headers = {"User-Agent": USER_AGENT, **settings.headers}
        self._base_origin = URL(settings.base_url).origin() if settings.base_url else None
        self._headers.update(marker_headers(settings.synthetic_header))
        self._cleanups = ShieldedCleanups()
        self._secret_variables = {
            variable
            for step in [*settings.steps, *settings.cleanup]
            for name, value in step.headers.items() if SECRET_NAME.search(name)
            for variable in _VARIABLE.findall(value)
        }
        # What the ledger keeps of a run: the values the cleanup steps use, save those a secret-named header carries.
        self._ledger_variables = {v for step in settings.cleanup for v in step.variables_used()} - self._secret_variables
        sweep = settings.sweep
        if sweep is not None:
            self._sweep_step = sweep.as_step()
            self._sweep_match = [parse_condition(c) for c in sweep.match]
            self._sweep_paths = {"items": parse_path(sweep.items), "created": parse_path(sweep.created)}
            self._sweep_extract = {v: parse_path(p) for v, p in sweep.extract.items()}

    async def close(self) -> None:
        await self._cleanups.drain()

    async def run(self, timer: PhaseTimer) -> Result:
        variables = {"run_id": secrets.token_hex(6), "timestamp": str(int(time.time()))}
        # A fresh cookie jar each run, for the platform's origin only: a login's session cookie reaches the next
        # steps, never another server, and never the next run.
        session = new_session(
            ssl_context=client_tls_context(self.settings.verify_tls, None), cookies_for=self.settings.cookie_origin(),
        )
        try:
            result = await self._run_steps(session, timer, variables)
        except BaseException:
            # Timed out, stopped mid-run, or a bug: clean up before the exception goes on.
            work = self._cleanup_then_close(session, None, variables)
            self._log_interrupted(await self._cleanups.run(work, if_interrupted=self._log_interrupted))
            raise
        # Shielded here too: the runner's timeout may fire while the cleanup runs.
        work = self._cleanup_then_close(session, timer, variables)
        problem = await self._cleanups.run(work, if_interrupted=self._log_interrupted)
        result = _scrubbed(result, self._run_scrubber(session, variables))
        if problem is None:
            return result
        if result.success:
            return Result.fail("cleanup", f"checks passed but cleanup failed: {problem}", phases=result.phases, checks=result.checks)
        return Result.fail(result.reason, f"{result.message}; cleanup also failed: {problem}", phases=result.phases, checks=result.checks)

    async def _run_steps(self, session: aiohttp.ClientSession, timer: PhaseTimer, variables: dict[str, str]) -> Result:
        checks: list[Check] = []
        summaries: list[str] = []
        for step in self.settings.steps:
            try:
                with timer.phase(step.name):
                    started = time.perf_counter()
                    step_checks, document = await self._run_step(session, step, variables)
            except _StepFailed as failed:
                return Result.fail(
                    failed.result.reason, f"step {step.name}: {failed.result.message}",
                    checks=tuple(checks + list(failed.result.checks)), retry_after=failed.result.retry_after,
                )
            checks += step_checks
            missing = None
            for variable, steps in self._extracts[step.name].items():
                value = lookup(document, steps)
                if is_missing(value) or value is None or isinstance(value, (dict, list)):
                    missing = missing or variable
                else:
                    variables[variable] = str(value)
            if self._ledger_variables & set(self._extracts[step.name]) & variables.keys():
                # Before anything else: from here on a kill would leave the ticket behind.
                await self.ledger.record(variables["run_id"], self._for_ledger(variables))
            if missing is not None:
                return Result.fail("assertion", f"step {step.name}: no {missing} in the answer "
                                   f"(path {step.extract[missing]})", checks=tuple(checks))
            summaries.append(f"{step.name} {format_duration(time.perf_counter() - started)}")
        return Result.ok(", ".join(summaries), checks=tuple(checks))

    async def _run_step(
        self, session: aiohttp.ClientSession, step: Step, variables: dict[str, str]
    ) -> tuple[list[Check], Any]:
        """One request, or with `poll` repeated requests until its checks pass or `within` runs out."""
        deadline = time.monotonic() + step.poll.within if step.poll else 0.0
        attempts = 0
        while True:
            attempts += 1
            status, body, wait = await self._request(session, step, variables)
            checks, document, failure = self._judge(step, status, body, wait)
            if failure is None:
                return checks, document
            if step.poll is None:
                raise _StepFailed(failure)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Checks that never came true within the SLA are "slow"; a step that kept erroring keeps its reason.
                reason = "slow" if failure.reason == "assertion" else failure.reason
                raise _StepFailed(Result.fail(
                    reason, f"not done within {format_duration(step.poll.within)} ({attempts} polls); "
                    f"last: {failure.message}", checks=failure.checks,
                ))
            await asyncio.sleep(min(step.poll.every, remaining))  # the last poll lands on the deadline

    async def _request(
        self, session: aiohttp.ClientSession, step: Step, variables: dict[str, str]
    ) -> tuple[int, bytes, float | None]:
        """Status, body, and whether the status, should it fail its check, is transient (`transient_wait`)."""
        url = _fill(step.url, variables, quote_values=True)
        if not URL(url).is_absolute():
            url = self.settings.base_url + url
        body_json = _fill_json(step.body_json, variables) if step.body_json is not None else None
        data: Any = _fill(step.body, variables) if step.body is not None else None
        if step.form is not None:
            data = {key: _fill(value, variables) for key, value in step.form.items()}
        # The probe's own headers may carry credentials for base_url: a step on another origin gets them without
        # those (its own headers are its own); redirects to another origin drop them too.
        shared = self._headers if URL(url).origin() == self._base_origin else without_credentials(self._headers)
        headers = {**shared, **{k: _fill(v, variables) for k, v in step.headers.items()}}
        try:
            async with request_following_redirects(
                session, step.method, URL(url), headers=headers, data=data, json=body_json
            ) as response:
                body, error = await read_limited(response, step.max_body_bytes)
                if error:
                    raise _StepFailed(Result.fail("body", error))
                return response.status, body, transient_wait(response.status, response.headers)
        except RedirectRefused as exc:
            raise _StepFailed(Result.fail("redirect", str(exc))) from None
        except aiohttp.ClientError as exc:
            raise _StepFailed(client_error_result(exc)) from None

    def _judge(
        self, step: Step, status: int, body: bytes, wait: float | None = None
    ) -> tuple[list[Check], Any, Result | None]:
        expected = ", ".join(str(s) for s in step.expect_status)
        if not status_matches(status, step.expect_status):
            check = Check(False, f"[{step.name}] status {status} in ({expected})")
            failure = Result.fail("status", f"HTTP {status}, expected {expected}", checks=(check,), retry_after=wait)
            return [check], None, failure
        checks = [Check(True, f"[{step.name}] status {status}")]
        conditions: list[Condition] = self._conditions[step.name]
        if not conditions and not step.extract:
            return checks, None, None
        try:
            document = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return checks, None, Result.fail("assertion", f"HTTP {status} but the body is not JSON", checks=tuple(checks))
        checks += [Check(c.passed, f"[{step.name}] {c.text}") for c in (cond.evaluate(document) for cond in conditions)]
        failed = [check.text for check in checks if not check.passed]
        if failed:
            return checks, document, Result.fail("assertion", "; ".join(failed), checks=tuple(checks))
        return checks, document, None

    def _log_interrupted(self, problem: str | None) -> None:
        """A cleanup failure the result cannot report, because the run was cancelled."""
        if problem:
            log.warning("probe %s: cleanup after an interrupted run failed: %s", self.settings.name, problem)

    async def _cleanup_then_close(
        self, session: aiohttp.ClientSession, timer: PhaseTimer | None, variables: dict[str, str]
    ) -> str | None:
        """The cleanup owns the run's session: it is closed only once the cleanup no longer needs it. What went
        wrong comes back scrubbed of the run's own secrets."""
        try:
            problem = await self._cleanup(session, timer, variables)
            if self._ledger_variables & variables.keys():  # the run recorded something: it is gone, or left over
                await self.ledger.settle(variables["run_id"], removed=problem is None)
            return self._run_scrubber(session, variables)(problem) if problem else None
        finally:
            await session.close()

    def _for_ledger(self, variables: dict[str, str]) -> dict[str, str]:
        return {name: value for name, value in variables.items() if name in self._ledger_variables}

    async def remove_leftover(self, variables: Mapping[str, str]) -> str | None:
        """The cleanup steps, with what an earlier run recorded; a 404 means it is gone already."""
        values = dict(variables)
        session = new_session(
            ssl_context=client_tls_context(self.settings.verify_tls, None), cookies_for=self.settings.cookie_origin(),
        )
        try:
            problem = await self._cleanup(session, None, values, leftover=True)
            return self._run_scrubber(session, values)(problem) if problem else None
        finally:
            await session.close()

    async def find_leftovers(self, now: float) -> tuple[list[dict[str, str]], str | None]:
        sweep = self.settings.sweep
        if sweep is None:
            return [], None
        session = new_session(
            ssl_context=client_tls_context(self.settings.verify_tls, None), cookies_for=self.settings.cookie_origin(),
        )
        try:
            async with asyncio.timeout(self.settings.timeout or 10.0):
                status, body, _ = await self._request(session, self._sweep_step, {"timestamp": str(int(now))})
        except _StepFailed as failed:
            return [], f"listing: {failed.result.message}"
        except TimeoutError:
            return [], f"listing: no answer within {format_duration(self.settings.timeout or 10.0)}"
        finally:
            await session.close()
        if not status_matches(status, sweep.expect_status):
            return [], f"listing: HTTP {status}, expected {', '.join(str(s) for s in sweep.expect_status)}"
        try:
            items = lookup(json.loads(body), self._sweep_paths["items"])
        except (ValueError, UnicodeDecodeError, RecursionError):
            return [], f"listing: HTTP {status} but the body is not JSON"
        if not isinstance(items, list):
            return [], f"listing: no list at {sweep.items}"
        found: list[dict[str, str]] = []
        undated = 0
        for item in items:
            if not all(condition.evaluate(item).passed for condition in self._sweep_match):
                continue
            created = _unix_time(lookup(item, self._sweep_paths["created"]))
            if created is None:
                undated += 1
                continue
            if now - created < sweep.min_age:
                continue  # may belong to a run in flight, here or on another replica or shard
            values = {name: lookup(item, path) for name, path in self._sweep_extract.items()}
            if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values.values()):
                found.append({name: str(value) for name, value in values.items()})
        problem = f"{undated} synthetic items without a readable {sweep.created} were left alone" if undated else None
        return found, problem

    def _run_scrubber(self, session: aiohttp.ClientSession, variables: dict[str, str]) -> Scrubber:
        """Masks what only this run knew: its cookies, and the values it sent in secret-looking headers (a CSRF
        token). The config's secrets are the runner's to scrub."""
        jar = session.cookie_jar
        found = jar.values() if isinstance(jar, OriginCookieJar) else []
        found += [variables[name] for name in self._secret_variables if name in variables]
        return Scrubber(found)

    async def _cleanup(
        self, session: aiohttp.ClientSession, timer: PhaseTimer | None, variables: dict[str, str], leftover: bool = False
    ) -> str | None:
        """Run every cleanup step whose variables are known (nothing to clean when the first step failed).

        Returns what went wrong, or None. Bounded by `cleanup_timeout` so a hung platform cannot hold a stop. For a
        `leftover` (an earlier run's, from the ledger), a 404 means it is gone, and a step whose values the entry
        does not hold is a problem, not a step to skip.
        """
        problems: list[str] = []
        try:
            async with asyncio.timeout(self.settings.cleanup_timeout):
                for step in self.settings.cleanup:
                    if not step.variables_used() <= set(variables):
                        if leftover:
                            unknown = ", ".join(sorted(step.variables_used() - set(variables)))
                            problems.append(f"{step.name}: the ledger entry does not hold {unknown}")
                        continue
                    try:
                        started = time.perf_counter()
                        status, body, _ = await self._request(session, step, variables)
                        _, _, failure = self._judge(step, status, body)
                        if failure is not None and not (leftover and status == 404):
                            problems.append(f"{step.name}: {failure.message}")
                    except _StepFailed as failed:
                        problems.append(f"{step.name}: {failed.result.message}")
                    finally:
                        if timer is not None:
                            timer.record(step.name, time.perf_counter() - started)
        except TimeoutError:
            problems.append(f"no answer within cleanup_timeout {format_duration(self.settings.cleanup_timeout)}")
        return "; ".join(problems) or None


def _unix_time(value: Any) -> float | None:
    """A listing's creation time as Unix seconds: a number of seconds, or an ISO 8601 string (UTC if unzoned)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    return None


def _scrubbed(result: Result, scrub: Scrubber) -> Result:
    checks = tuple(replace(check, text=scrub(check.text)) for check in result.checks)
    return replace(result, message=scrub(result.message), checks=checks)


def _fill(template: str, variables: dict[str, str], quote_values: bool = False) -> str:
    def value(match: re.Match[str]) -> str:
        found = variables.get(match.group(1), match.group(0))
        return quote(found, safe="") if quote_values else found

    return _VARIABLE.sub(value, template)


def _fill_json(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _fill(value, variables)
    if isinstance(value, dict):
        return {key: _fill_json(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_json(item, variables) for item in value]
    return value
