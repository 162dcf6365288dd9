"""The ``pipeline`` command. Parses flags, calls one function per command; no logic here.

Heavy modules are imported inside the commands so ``pipeline --help`` starts fast.
Exit status: 0 all answered; 1 some failed (recorded); 2 bad spec or input (nothing sent);
3 stopped by the budget cap; 130 interrupted (resumable).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")
log = logging.getLogger("pipeline")


def _setup_logging(verbose: bool) -> None:
    """Our messages go to stderr as "pipeline: ..."; other libraries stay quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pipeline: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "aiohttp", "alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _arun(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; user mistakes and storage faults become one line and an exit status."""
    import anyio

    from pipeline.errors import PipelineError, StorageError, UserError

    try:
        try:
            return anyio.run(fn, backend_options=_loop_options())
        except BaseExceptionGroup as group:  # a task group's failure: report its cause
            raise _cause(group) from None
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except StorageError as exc:
        click.echo(f"error: {exc} (the run is resumable once this is fixed)", err=True)
        sys.exit(1)
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 1)))
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


def _loop_options() -> dict[str, Any]:
    """uvloop when installed (Linux, macOS): its event loop halves the per-request CPU of
    the loop itself, which is most of what a thousand concurrent requests cost."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def _cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group's exceptions: ours first, then an interrupt."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    from pipeline.errors import PipelineError

    for kind in (PipelineError, KeyboardInterrupt):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llm-batch-pipeline")
def main() -> None:
    """Batch chat completions against any OpenAI-compatible endpoint, recorded in SQLite and Parquet."""


def entry() -> None:
    """The ``pipeline`` executable and ``python -m pipeline``: :func:`main`, then a quick exit.

    When a command returns, its files are written and closed, its connections closed; the
    interpreter's teardown after that (every module's objects freed one by one) took ~25 ms
    of a run's wall time, and more the more was imported (``bench/throughput.py``'s tail).
    So when no other thread still works (none but daemons), the atexit handlers run (the log
    handlers are flushed by theirs), the output streams are flushed, and the process ends
    with the command's exit status without that teardown. Otherwise it exits as usual.
    """
    _arrow_memory_pool()
    try:
        main()
    except SystemExit as exc:
        _exit_now(exc.code)
        raise


def _arrow_memory_pool() -> None:
    """Arrow's buffers from jemalloc (on Linux, where pyarrow's wheels have it), unless
    ``ARROW_DEFAULT_MEMORY_POOL`` already names a pool. Set before pyarrow is imported: Arrow
    reads it once. pyarrow's default, mimalloc, keeps much of what the Parquet reader and
    writers free: a run of 100,000 template rows held 210-260 MB while sending, against
    175-185 MB with jemalloc, at the same speed (``bench/memory.py``'s run, 2026-12-02)."""
    import os

    if sys.platform == "linux":
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def _exit_now(code: object) -> None:
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    if code is not None and not isinstance(code, int):
        return  # a message: the usual exit prints it (the commands exit with numbers)
    status = code or 0
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let the usual exit report it
        return
    os._exit(status & 0xFF)


# The help names the variable, never its value: a URL in it may hold a password.
_DB_DEFAULT_HELP = "default: $PIPELINE_DB, else pipeline.db"


def _db_option(*decls: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--db of the commands that read a database: unset, $PIPELINE_DB, else pipeline.db."""

    def resolve(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
        from pipeline.spec import default_db

        return value or default_db()

    return click.option(*decls, callback=resolve, help=f"SQLite file or database URL ({_DB_DEFAULT_HELP}).")


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--input",
            "input_path",
            type=click.Path(path_type=Path),
            help="JSONL or Parquet input file.",
        ),
        click.option("--base-url", help="Endpoint base URL, e.g. https://api.openai.com/v1 (or 'mock')."),
        click.option(
            "--api-key-env",
            metavar="NAME",
            help="Environment variable holding the API key (default OPENAI_API_KEY).",
        ),
        click.option("--model", help="Primary model."),
        click.option("--fallback", "fallbacks", multiple=True, help="Fallback model, in order (repeatable)."),
        click.option(
            "--rpm",
            type=click.IntRange(min=0),
            help="Requests per minute per route (0 = no limit).",
        ),
        click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute per route (0 = no limit)."),
        click.option("--concurrency", type=click.IntRange(min=1), help="Requests in flight per route."),
        click.option("--db", help=f"SQLite file or database URL ({_DB_DEFAULT_HELP})."),
        click.option("--out", type=click.Path(path_type=Path), help="Output folder (default out/)."),
        click.option("--run-id", help="Run id (default: the job name); rerunning it resumes."),
        click.option("--job", help="Job name (default: the spec file's or input file's name)."),
        click.option("--new-run", is_flag=True, default=None, help="Start a fresh run even if one exists."),
        click.option(
            "--budget-usd", help="Cap on this run's spend in USD: dispatch stops before passing it (exit 3)."
        ),
        click.option(
            "--on-bad-row",
            type=click.Choice(["stop", "skip"]),
            help="stop: send nothing if any row is bad (default); skip: reject bad rows, send the rest.",
        ),
        click.option(
            "--stream/--no-stream",
            default=None,
            help="Stream the answers (SSE, with usage) and record time to first token; "
            "routes that set their own 'stream' keep it.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _overrides(kw: dict[str, Any]) -> dict[str, Any]:
    ov: dict[str, Any] = {}
    if kw.get("input_path") is not None:
        ov["input"] = {"path": str(kw["input_path"])}
    for key in (
        "base_url",
        "api_key_env",
        "model",
        "db",
        "run_id",
        "job",
        "on_bad_row",
        "budget_usd",
    ):
        if kw.get(key) is not None:
            ov[key] = kw[key]
    if kw.get("fallbacks"):
        ov["fallbacks"] = list(kw["fallbacks"])
    limits = {k: kw[k] for k in ("rpm", "tpm", "concurrency") if kw.get(k) is not None}
    if limits:
        ov["limits"] = limits
    if kw.get("out") is not None:
        ov["out"] = str(kw["out"])
    if kw.get("new_run"):
        ov["new_run"] = True
    if kw.get("stream") is not None:
        ov["stream"] = kw["stream"]
    return ov


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@_run_options
@click.option("--retry-failed", is_flag=True, help="Also send again the requests that ended failed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(spec: Path | None, retry_failed: bool, quiet: bool, verbose: bool, **kw: Any) -> None:
    """Run a job (SPEC is a TOML file under jobs/; flags override its fields).

    Rerunning the same run resumes it: only requests not yet answered are sent.
    """
    _setup_logging(verbose)

    async def go() -> Any:
        from pipeline.progress import make_display
        from pipeline.run import execute
        from pipeline.spec import load_spec

        job = load_spec(spec, _overrides(kw))
        return await execute(job, display=make_display(quiet=quiet), retry_failed=retry_failed)

    summary = _arun(go)
    _print_summary(summary)
    from pipeline.collector import no_collection_at_exit

    no_collection_at_exit()
    sys.exit(summary.exit_code)


def _print_summary(summary: Any) -> None:
    c = summary.counts
    click.echo(
        f"run {summary.run_id}: {summary.state}; {c.get('succeeded', 0)} succeeded, "
        f"{c.get('failed', 0)} failed, {c.get('rejected', 0)} rejected, {c.get('pending', 0)} pending"
    )
    if summary.message:
        click.echo(summary.message, err=True)
    click.echo(f"database: {summary.db}   results: {summary.results}")


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@_run_options
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def submit(spec: Path | None, verbose: bool, **kw: Any) -> None:
    """Load a run's requests into the database for workers (send nothing).

    Use a database server shared by the workers (--db postgresql+asyncpg://...). Rows are
    checked and loaded in batches, in one transaction; submitting again finds them loaded.
    Then start any number of 'pipeline worker' processes, on any machines.
    """
    _setup_logging(verbose)

    async def go() -> Any:
        from pipeline.run import submit as submit_run
        from pipeline.spec import load_spec

        return await submit_run(load_spec(spec, _overrides(kw)))

    s = _arun(go)
    n = sum(s.counts.values())
    how = "already loaded" if s.already_loaded else "loaded"
    left = s.counts.get("pending", 0) + s.counts.get("in_flight", 0)
    click.echo(f"run {s.run_id}: {how}, {n} requests ({left} to send); database: {s.db}")
    click.echo(f"start workers with: pipeline worker --db URL --run {s.run_id}")


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@_db_option("--db")
@click.option("--run", "run_id", help="Work on this run only (default: every submitted run with work left).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: the run's).")
@click.option(
    "--lease-s",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="How long a claim lasts unless renewed: a dead worker's requests go to others after it.",
)
@click.option("--retry-failed", is_flag=True, help="Also send again the requests that ended failed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def worker(
    spec: Path | None,
    db: str,
    run_id: str | None,
    out: Path | None,
    lease_s: float,
    retry_failed: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Claim and send requests of submitted runs until none is left.

    Any number of workers may share a run: each claims batches (SELECT ... FOR UPDATE SKIP
    LOCKED) under a lease it renews; rate limits and the budget hold for their sum. SPEC, if
    given, replaces the sending setup stored with the run (e.g. endpoint headers). API keys
    come from this machine's environment.
    """
    _setup_logging(verbose)

    async def go() -> Any:
        from pipeline.progress import make_display
        from pipeline.run import work
        from pipeline.spec import load_spec

        job = None if spec is None else load_spec(spec, {"db": db}, need_input=False)
        return await work(
            db,
            run_id=run_id,
            spec=job,
            out=out,
            display=make_display(quiet=quiet),
            retry_failed=retry_failed,
            lease_s=lease_s,
        )

    summaries = _arun(go)
    if not summaries:
        click.echo("no submitted run has requests left to send")
        sys.exit(0)
    for summary in summaries:
        _print_summary(summary)
    from pipeline.collector import no_collection_at_exit

    no_collection_at_exit()
    sys.exit(max(s.exit_code for s in summaries))


@main.command()
@click.argument("run_id", required=False)
@_db_option("--db")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_id: str | None, db: str, as_json: bool) -> None:
    """Progress of a run (default: the latest): counts by state, tokens, cost."""
    from pipeline import reports

    info = _arun(lambda: reports.status(db, run_id))
    if as_json:
        import orjson

        click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return
    c = info["counts"]
    click.echo(f"run {info['run_id']} (job {info['job']}): {info['state']}")
    click.echo(
        f"  requests {info['requests']}: {c['succeeded']} succeeded, {c['failed']} failed, "
        f"{c['rejected']} rejected, {c['pending']} pending, {c['in_flight']} in flight"
    )
    if c["in_flight"] and info["state"] != "running":
        click.echo(
            f"  {c['in_flight']} requests were in flight when the run stopped: the provider may have "
            "answered (and billed) them; a rerun sends them again, or recovers them if "
            "[recovery] stored_completions is on"
        )
    click.echo(
        f"  attempts {info['attempts']}; tokens: prompt {info['prompt_tokens']} "
        f"(cached {info['cached_tokens']}), completion {info['completion_tokens']} "
        f"(reasoning {info['reasoning_tokens']})"
    )
    cost = info["cost_usd"] if info["cost_usd"] is not None else "unknown"
    line = f"  cost: ${cost} computed"
    if info["reported_cost_usd"] is not None:
        line += f", ${info['reported_cost_usd']} reported by the provider"
    if info["unpriced_attempts"]:
        line += f"; {info['unpriced_attempts']} attempts have no known price"
    click.echo(line)
    live = [w for w in info["workers"] if w["finished_at"] is None]
    if info["workers"]:
        click.echo(
            f"  workers: {len(info['workers'])} in all, {len(live)} not finished"
            + "".join(f"\n    {w['worker_id']} (last seen {w['heartbeat_at']})" for w in live)
        )
    if info["error"]:
        click.echo(f"  note: {info['error']}")


@main.command()
@click.argument("run_id")
@_db_option("--db")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (default RUN.FORMAT).")
def export(run_id: str, db: str, fmt: str, output: Path | None) -> None:
    """Rewrite a run's results from the database (JSONL in OpenAI batch-output shape)."""
    from pipeline import reports

    target = output or Path(f"{run_id}.{fmt}")
    n = _arun(lambda: reports.export(db, run_id, fmt, target))
    click.echo(f"wrote {n} rows to {target}")


@main.command()
@_db_option("--db")
@click.option("--by", type=click.Choice(["model", "day", "run", "route"]), default="model", show_default=True)
@click.option("--since", metavar="YYYY-MM-DD", help="Only attempts from this day on.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
def report(db: str, by: str, since: str | None, fmt: str) -> None:
    """Cost and token audit from the database, every attempt counted."""
    from pipeline import reports

    cols, rows = _arun(lambda: reports.report(db, by, since))
    if fmt == "json":
        import orjson

        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2, default=str).decode())
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(cols))
        w.writeheader()
        w.writerows(rows)
    else:
        click.echo(_text_table(cols, rows) if rows else "no attempts recorded")


def _text_table(cols: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned columns (numbers right-aligned), one line per row."""
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [
        all(row[i].replace(".", "", 1).lstrip("-").isdigit() or not row[i] for row in cells)
        for i in range(len(cols))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        )

    return "\n".join([line(cols), *(line(row) for row in cells)]).rstrip()


@main.command()
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def estimate(spec: Path | None, as_json: bool, **kw: Any) -> None:
    """Rows, estimated tokens and cost (expected and worst case) before spending anything."""
    from pipeline import reports
    from pipeline.spec import load_spec

    async def go() -> Any:
        return await reports.estimate(load_spec(spec, _overrides(kw)))

    info = _arun(go)
    if as_json:
        import orjson

        click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"{info['input']}: {info['rows']} requests")
    click.echo(
        f"  estimated prompt tokens {info['prompt_tokens']}, output allowance {info['max_output_tokens']}"
    )
    for r in info["routes"]:
        if r["worst_case_cost_usd"] is None:
            click.echo(f"  {r['endpoint']}/{r['model']}: no price known (add [prices.{r['model']}])")
        else:
            click.echo(
                f"  {r['endpoint']}/{r['model']}: input ${r['input_cost_usd']}, "
                f"expected ${r['expected_cost_usd']}, worst case ${r['worst_case_cost_usd']}"
            )
    for note in info["notes"]:
        click.echo(f"  note: {note}")


@main.command(
    "mock-server",
    epilog="""\b
Faults per model (--fault MODEL=KIND[:N], repeatable; :N = only the first N
sightings of each distinct request body, so a retry succeeds; no :N = always):
  400-599          that HTTP status with its real error body (401 invalid_api_key,
                   402 OpenRouter "Insufficient credits", 403, 404 model_not_found,
                   408, 409, 422, 429 with Retry-After seconds, 500, 502, 503, 504,
                   520-529, ...)
  429-date         429 with Retry-After as an HTTP date
  429-ms           429 with retry-after-ms only
  insufficient_quota   429 insufficient_quota (out of quota: not worth retrying)
  unauthorized     401 invalid_api_key
  context_length   400 context_length_exceeded
  content_filter_400     400 content_filter (Azure)
  content_filter_finish  200 with finish_reason "content_filter", content null
  finish_error     200 with finish_reason "error", usage included
  bad_request      400 invalid_request_error
  hang             read the request, never answer (until the client gives up)
  reset            close the connection without a response
  truncated        send half the body under a Content-Length for all of it
  invalid_json     200 whose body is not JSON
  schema_violation 200 whose content matches no structured-output schema
  refusal          200 with content null and a refusal
  reasoning_exhausted  200, finish_reason "length", empty content, all tokens reasoning

\b
Example: pipeline mock-server --fault mock-small=503:2 --fault gpt-4o=hang""",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port.")
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option(
    "--rpm",
    type=click.IntRange(min=0),
    default=0,
    help="Requests per minute before 429 (0 = none).",
)
@click.option("--tpm", type=click.IntRange(min=0), default=0, help="Tokens per minute before 429 (0 = none).")
@click.option("--rate-429", type=click.FloatRange(0, 1), default=0.0, help="Share of random 429s.")
@click.option("--rate-500", type=click.FloatRange(0, 1), default=0.0, help="Share of random 500s.")
@click.option(
    "--rate-invalid-json",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of broken 200 bodies.",
)
@click.option(
    "--retry-after", type=float, default=1.0, show_default=True, help="Retry-After seconds on 429s."
)
@click.option("--api-key", help="Require this bearer key (default: accept any).")
@click.option("--seed", type=int, default=0)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="MODEL=KIND[:N]",
    help="Requests for MODEL misbehave as KIND (see below); repeatable, one per model.",
)
@click.option(
    "--chunk-chars",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Streamed: characters per content delta.",
)
@click.option(
    "--chunk-delay-ms", type=click.FloatRange(min=0), default=0.0, help="Streamed: delay between events."
)
@click.option(
    "--stream-fault",
    type=click.Choice(["cut", "error", "stall", "no-usage", "no-done"]),
    help="Streamed answers: cut the connection, send an error event, or stall after "
    "--stream-fault-after events; or end without the usage chunk / without [DONE].",
)
@click.option("--stream-fault-after", type=click.IntRange(min=0), default=3, show_default=True)
def mock_server(**kw: Any) -> None:
    """A local OpenAI-compatible server for demos, tests and benchmarks."""
    from pipeline.mock import MockConfig, parse_fault
    from pipeline.mock import main as serve
    from pipeline.mock.stream_faults import StreamFaults

    k = kw["stream_fault_after"]
    stream_fault = {
        None: {},
        "cut": {"cut_after": k},
        "error": {"error_after": k},
        "stall": {"stall_after": k},
        "no-usage": {"no_usage": True},
        "no-done": {"no_done": True},
    }[kw["stream_fault"]]
    streaming = StreamFaults(
        chunk_chars=kw["chunk_chars"], chunk_delay_ms=kw["chunk_delay_ms"], **stream_fault
    )

    model_faults = {}
    for text in kw["faults"]:
        try:
            model, fault = parse_fault(text, retry_after_s=kw["retry_after"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--fault") from None
        if model in model_faults:
            raise click.BadParameter(f"{text!r}: a second fault for model {model!r}", param_hint="--fault")
        model_faults[model] = fault
    serve(
        MockConfig(
            model_faults=model_faults,
            host=kw["host"],
            port=kw["port"],
            latency_ms=kw["latency_ms"],
            rpm=kw["rpm"],
            tpm=kw["tpm"],
            rate_429=kw["rate_429"],
            rate_500=kw["rate_500"],
            rate_invalid_json=kw["rate_invalid_json"],
            retry_after_s=kw["retry_after"],
            api_key=kw["api_key"],
            seed=kw["seed"],
            streaming=streaming,
        )
    )


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@_db_option("--db", "db_")
def db_upgrade(db_: str) -> None:
    """Apply the schema migrations (runs do this themselves)."""
    from pipeline.spec import db_url
    from pipeline.store import Store

    async def go() -> str:
        store = await Store.open(db_url(db_), migrate=False)
        try:
            return await store.migrate()
        finally:
            await store.close()

    head = _arun(go)
    from pipeline.spec import db_display

    click.echo(f"database {db_display(db_)} is at revision {head}")


if __name__ == "__main__":  # pragma: no cover
    main()
