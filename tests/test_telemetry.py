"""One source of truth for telemetry: the log calls in the code.

Every event name and `extra` key the app logs is read from `shared/**/*.py` and `function_app.py`
with `ast` (calls `log.<level>(…, extra={…})`, noting `log.exception` / `exc_info`, which land in
the `exceptions` table instead of `traces`). Every KQL query the project ships — the alert rules
(infra/app/alerts.bicep), the workbook (infra/app/workbook.json) and the README's ```kusto blocks —
may then only name those events, only read `customDimensions.<key>` keys those events carry, and
must read each event from the table it lands in. The README's table of structured-log keys lists
exactly what the code logs.

The mapping those queries rely on (keys as-is, values as strings, exception records → exceptions)
is checked against the exporter the worker uses (azure-monitor-opentelemetry), and
`shared.telemetry.configure_logging()` against an OpenTelemetry handler on the root logger, as the
Python worker attaches it when PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY is true.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "shared").rglob("*.py")) + [ROOT / "function_app.py"]
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}

# Parts of event names built at run time → the values they take, and the module that gives them
# (None: the same module). Each value must still appear as a string in that module; a new dynamic
# part fails the test until it is added here.
DYNAMIC_PARTS = {
    ("shared/flows/invoicing/parts.py", "status"): (("succeeded", "failed"), None),  # finished_entity(row, status, …)
    ("shared/flows/directory/claims.py", "kind.name"): (("customer", "item"),        # Kind("customer", …)
                                                        "shared/flows/directory/links.py"),
    ("shared/flows/directory/claims.py", "origin"): (("created", "linked"),          # Link.origin
                                                     "shared/flows/directory/resolver.py"),
}

SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
TABLES = ("traces", "exceptions", "requests", "dependencies", "customEvents", "customMetrics")


# --- the log calls -------------------------------------------------------------------------------

@dataclass
class LogCall:
    path: str
    line: int
    level: str
    events: tuple[str, ...]       # the event names it can log (dynamic parts expanded)
    keys: frozenset[str]          # its `extra` keys
    exception: bool               # log.exception / exc_info: the exceptions table
    key_patterns: tuple[str, ...] = ()  # keys built at run time (`**{f"{a}_{b}": …}`), as regexes

    @property
    def table(self) -> str:
        return "exceptions" if self.exception else "traces"


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def trees() -> dict[str, ast.Module]:
    return {relative(path): ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in SOURCES}


def logger_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to `logging.getLogger(…)`."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and func.attr == "getLogger":
                names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def string_constants(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def event_names(path: str, tree: ast.Module, node: ast.expr) -> tuple[str, ...]:
    """The names an `event` value can take: a literal, `"prefix_" + part` or an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return tuple(left + right for left in event_names(path, tree, node.left)
                     for right in event_names(path, tree, node.right))
    if isinstance(node, ast.JoinedStr):
        names = ("",)
        for part in node.values:
            if isinstance(part, ast.Constant):
                options = (part.value,)
            else:
                options = dynamic_part(path, tree, part.value)
            names = tuple(name + option for name in names for option in options)
        return names
    return dynamic_part(path, tree, node)


def dynamic_part(path: str, tree: ast.Module, node: ast.expr) -> tuple[str, ...]:
    source = ast.unparse(node)
    values, given_in = DYNAMIC_PARTS.get((path, source), ((), None))
    assert values, f"{path}: an event name is built from `{source}`; add its values to DYNAMIC_PARTS"
    if given_in is not None:
        tree = ast.parse((ROOT / given_in).read_text(encoding="utf-8"), given_in)
    missing = set(values) - string_constants(tree)
    assert not missing, f"{path}: `{source}` no longer takes {missing}; update DYNAMIC_PARTS"
    return values


# The one `**spread` in an `extra`: sync_run_finished's (and sync_business_finished's) `**flat`,
# `count_<key>` for every number in the counts. Its keys are read from the code that adds them up.

def function(tree: ast.Module, name: str) -> ast.AsyncFunctionDef | ast.FunctionDef:
    return next(node for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name)


def numeric_dict_keys(node: ast.expr, bound: dict[str, ast.expr]) -> tuple[set[str], list[str]]:
    """(keys of the dict literals in `node` whose values are not text or dicts, names of the
    `**spreads` in them), `node` being a dict literal or `a | {…}` expressions of them."""
    keys, spreads = set(), []
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        for side in (node.left, node.right):
            more, spread = numeric_dict_keys(side, bound)
            keys |= more
            spreads += spread
    elif isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                spreads.append(ast.unparse(value))
            elif isinstance(key, ast.Constant) and not textual(value, bound):
                keys.add(key.value)
    return keys, spreads


def textual(value: ast.expr, bound: dict[str, ast.expr]) -> bool:
    """Whether a dict value is text or a dict (dropped by the `isinstance(v, (int, float))`)."""
    if isinstance(value, ast.Name) and value.id in bound:
        value = bound[value.id]
    return (isinstance(value, (ast.Dict, ast.DictComp, ast.JoinedStr))
            or (isinstance(value, ast.Constant) and isinstance(value.value, str))
            or (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "str"))


def bindings(func: ast.AST) -> dict[str, ast.expr]:
    return {target.id: node.value for node in ast.walk(func) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def returned_count_keys(tree: ast.Module, name: str) -> set[str]:
    """Number keys of the dict a function returns: literals in its `return`s, the dict variable
    they return (its literal, `var["k"] = …`, `var |= await other()` of the same module)."""
    func = function(tree, name)
    bound, keys = bindings(func), set()
    returned = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Return) and node.value is not None:
            more, _ = numeric_dict_keys(node.value, bound)
            keys |= more
            returned |= {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in returned for t in node.targets):
            keys |= numeric_dict_keys(node.value, bound)[0]
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                    and target.value.id in returned and isinstance(target.slice, ast.Constant)):
                keys.add(target.slice.value)
        if (isinstance(node, ast.AugAssign) and isinstance(node.op, ast.BitOr)
                and isinstance(node.target, ast.Name) and node.target.id in returned):
            call = node.value.value if isinstance(node.value, ast.Await) else node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                keys |= returned_count_keys(tree, call.func.id)
    return keys


def sync_run_count_keys(all_trees: dict[str, ast.Module]) -> set[str]:
    """The numbers of a sync run: what `last_sync` adds up over the businesses (`SUMMED`), the
    run's `seconds`, and what reconciliation returns (merged into the run's counts)."""
    sync = all_trees["shared/flows/sync/run.py"]
    summed = next(node for node in sync.body
                  if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "SUMMED")
    calendar = all_trees["shared/flows/sync/calendar.py"]
    counts_class = next(node for node in calendar.body
                        if isinstance(node, ast.ClassDef) and node.name == "BusinessCounts")
    fields = {node.target.id for node in counts_class.body if isinstance(node, ast.AnnAssign)}
    keys = {element.value for element in summed.value.elts}
    assert fields <= keys, f"BusinessCounts fields not added up in last_sync: {fields - keys}"
    return keys | {"seconds"} | returned_count_keys(all_trees["shared/flows/invoicing/reconcile.py"], "reconcile_invoices")


def spread_keys(path: str, func: ast.AST, value: ast.expr, all_trees: dict[str, ast.Module]) -> tuple[set[str], str]:
    """(keys, or else a regex of the keys) of a `**spread` in an extra."""
    if isinstance(value, ast.Name):
        value = bindings(func).get(value.id)
    if not (isinstance(value, ast.DictComp) and isinstance(value.key, ast.JoinedStr)):
        raise AssertionError(f"{path}: a `**spread` in an extra; teach tests/test_telemetry.py to expand it")
    if path == "shared/flows/sync/run.py" and "counts.items()" == ast.unparse(value.generators[0].iter):
        prefix = "".join(part.value for part in value.key.values if isinstance(part, ast.Constant))
        if re.fullmatch(r"\w+", prefix) and len(value.key.values) == 2:
            return {prefix + key for key in sync_run_count_keys(all_trees)}, ""
    return set(), "".join(re.escape(part.value) if isinstance(part, ast.Constant) else "[A-Za-z0-9]+"
                          for part in value.key.values)


def enclosing_functions(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                parents.setdefault(child, node)
    return parents


def log_calls() -> list[LogCall]:
    all_trees, found = trees(), []
    for path, tree in all_trees.items():
        loggers, parents = logger_names(tree), enclosing_functions(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in loggers
                    and node.func.attr in LEVELS):
                continue
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            extra = keywords.get("extra")
            exc_info = keywords.get("exc_info")
            exception = node.func.attr == "exception" or (
                exc_info is not None and not (isinstance(exc_info, ast.Constant) and not exc_info.value))
            events, keys, patterns = (), set(), []
            if extra is not None:
                assert isinstance(extra, ast.Dict), f"{path}:{node.lineno}: extra must be a dict literal"
                for key, value in zip(extra.keys, extra.values, strict=True):
                    if key is None:
                        more, pattern = spread_keys(path, parents.get(node, tree), value, all_trees)
                        keys |= more
                        patterns += [pattern] if pattern else []
                        continue
                    assert isinstance(key, ast.Constant), f"{path}:{node.lineno}: extra keys must be literals"
                    keys.add(key.value)
                    if key.value == "event":
                        events = event_names(path, tree, value)
            found.append(LogCall(path, node.lineno, node.func.attr, events, frozenset(keys), exception,
                                 tuple(patterns)))
    return found


@pytest.fixture(scope="module")
def calls() -> list[LogCall]:
    return log_calls()


@pytest.fixture(scope="module")
def events(calls) -> dict[str, set[str]]:
    """Event → the tables it lands in."""
    found: dict[str, set[str]] = {}
    for call in calls:
        for event in call.events:
            found.setdefault(event, set()).add(call.table)
    return found


def keys_of(calls: list[LogCall], event: str | None = None) -> set[str]:
    return set().union(*(call.keys for call in calls if event is None or event in call.events))


def logged_key(calls: list[LogCall], key: str, events: list[str] | None = None) -> bool:
    """Whether `key` is an `extra` key of one of `events` (default: of any event)."""
    chosen = [call for call in calls if not events or set(call.events) & set(events)]
    return any(key in call.keys or any(re.fullmatch(p, key) for p in call.key_patterns) for call in chosen)


def test_the_code_is_read_as_expected(calls, events):
    """The extraction itself: known calls are found with their keys and tables."""
    assert len(calls) > 30
    assert events["sync_run_finished"] == {"traces"}
    assert events["sync_run_failed"] == events["http_failed"] == {"exceptions"}
    assert events["message_poisoned"] == events["invoice_job_part_failed"] == {"traces"}
    assert {"invoice_job_part_succeeded", "customer_created", "item_linked", "item_waiting"} <= set(events)
    finished = keys_of(calls, "sync_run_finished")
    # Counts are prefixed `count_` (a bare `created` would collide with LogRecord.created), hence
    # customDimensions.count_seconds, not .seconds.
    assert {"run_id", "outcome", "trigger", "count_fetched", "count_seconds", "count_tableWrites",
            "count_customersQueued", "count_invoicesChecked", "count_partsRequeued"} <= finished
    assert not {"seconds", "count_businesses", "count_reconcileError", "count_reconcileSkipped"} & finished
    assert keys_of(calls, "upstream_retry") == {"event", "service", "status", "attempt"}
    for call in calls:
        assert call.events or not call.keys, f"{call.path}:{call.line}: extra without an event"


# --- the queries ---------------------------------------------------------------------------------

@dataclass
class Query:
    where: str
    text: str
    tables: set[str] = field(default_factory=set)
    literals: list[str] = field(default_factory=list)
    dimensions: set[str] = field(default_factory=set)


KQL_STRING = re.compile(r'@"[^"]*"|@\'[^\']*\'|"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')


def parse_kql(where: str, text: str) -> Query:
    query = Query(where, text)
    code = []
    position = 0
    for m in KQL_STRING.finditer(text):
        code.append(text[position:m.start()])
        literal = m.group(0)
        query.literals.append(literal[2:-1] if literal.startswith("@") else literal[1:-1])
        code.append('""')
        position = m.end()
    code.append(text[position:])
    bare = re.sub(r"//[^\n]*", "", "".join(code))
    query.tables = {table for table in TABLES if re.search(rf"(?<![\w.]){table}(?![\w])", bare)}
    query.dimensions = set(re.findall(r"customDimensions\.(\w+)", bare))
    query.dimensions |= set(re.findall(r"""customDimensions\[\s*["']([^"']+)["']\s*\]""", text))
    return query


def alert_queries() -> list[Query]:
    text = (ROOT / "infra" / "app" / "alerts.bicep").read_text(encoding="utf-8")
    found = [parse_kql(f"alerts.bicep {name}", body)
             for name, body in re.findall(r"^var[ \t]+(\w+Query)[ \t]*=[ \t]*'''(.*?)'''", text, re.MULTILINE | re.DOTALL)]
    assert len(found) == len(re.findall(r"^[ \t]*query: \w+Query$", text, re.MULTILINE)) == 4
    return found


def workbook_items() -> list[dict]:
    data = json.loads((ROOT / "infra" / "app" / "workbook.json").read_text(encoding="utf-8"))

    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("content", {}).get("items", []))
    return list(walk(data["items"]))


def workbook_queries() -> list[Query]:
    return [parse_kql(f"workbook.json {item['name']}", item["content"]["query"])
            for item in workbook_items() if item["type"] == 3 and item["content"].get("queryType") == 0]


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def readme_queries() -> list[Query]:
    found = []
    for number, (language, body) in enumerate(fenced_blocks(readme()), 1):
        if language in ("kusto", "kql"):
            found.append(parse_kql(f"README.md block {number}", body))
        else:
            assert "customDimensions" not in body, f"README.md block {number}: KQL must be fenced as ```kusto"
    return found


def all_queries() -> list[Query]:
    return alert_queries() + workbook_queries() + readme_queries()


def test_every_query_is_found():
    assert len(workbook_queries()) >= 10
    assert len(readme_queries()) >= 6


@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.where)
def test_queries_use_only_what_the_app_logs_from_the_table_it_lands_in(query, calls, events):
    assert query.tables & {"traces", "exceptions"}, f"{query.where}: reads no traces or exceptions"
    assert query.tables <= {"traces", "exceptions"}, f"{query.where}: {query.tables}"
    named = [literal for literal in query.literals if SNAKE_CASE.fullmatch(literal)]
    unknown = [name for name in named if name not in events]
    assert not unknown, f"{query.where}: the app logs no event {unknown}"
    for event in named:
        assert events[event] & query.tables, \
            f"{query.where}: {event} lands in {events[event]}, the query reads {query.tables}"
    missing = {key for key in query.dimensions if not logged_key(calls, key, named)}
    assert not missing, f"{query.where}: customDimensions {missing} are not logged by {named or 'any event'}"


def test_workbook_items_are_log_queries_with_charts_where_a_chart_helps():
    visualizations = {}
    for item in workbook_items():
        assert item.get("name"), "every workbook item has a unique name"
        if item["type"] == 3:
            content = item["content"]
            assert content["version"] == "KqlItem/1.0" and content["queryType"] == 0
            assert content["resourceType"] == "microsoft.insights/components"
            assert content.get("timeContextFromParameter") == "TimeRange"
            assert not re.search(r"\{(?!TimeRange)[^}]*\}", content["query"]), "only {TimeRange} is a parameter"
            visualizations[item["name"]] = content["visualization"]
    names = [item["name"] for item in workbook_items()]
    assert len(names) == len(set(names))
    assert set(visualizations.values()) <= {"timechart", "barchart", "table", "tiles", "piechart"}
    assert sum(kind in ("timechart", "barchart") for kind in visualizations.values()) >= 8
    covered = " ".join(query.text for query in workbook_queries())
    for event in ("sync_run_finished", "invoice_created", "invoice_job_part_failed", "upstream_retry",
                  "upstream_gave_up", "message_poisoned"):
        assert f'"{event}"' in covered, event


# --- the README's table of structured-log keys ---------------------------------------------------

def readme_log_table() -> dict[str, str]:
    """First-column backticked names → the row, in the table under "### Structured logs"."""
    text = readme()
    section = text[text.index("### Structured logs"):]
    section = section[:section.index("\n### ", 1)]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| key") and not line.startswith("|---"):
            first, rest = line.strip("|").split("|", 1)
            for name in re.findall(r"`([\w.]+)`", first):
                rows[name] = rest
    return rows


def test_readme_documents_what_the_queries_use_and_nothing_the_app_does_not_log(calls, events):
    """The README's table of keys (and its list of events) names only what the code logs, and
    explains every key and event that a shipped query (alerts, workbook, README) reads."""
    rows = readme_log_table()
    stale = {key for key in rows if not logged_key(calls, key)}
    assert not stale, f"README.md documents keys the app does not log: {stale}"
    listed = set(re.findall(r"`([a-z][a-z0-9_]*)`", rows["event"]))
    assert listed <= set(events), f"README.md lists events the app does not log: {listed - set(events)}"
    queries = all_queries()
    used_keys = set().union(*(query.dimensions for query in queries))
    used_events = {literal for query in queries for literal in query.literals if literal in events}
    assert used_keys <= set(rows), f"README.md does not explain {used_keys - set(rows)}"
    assert used_events <= listed, f"README.md does not list {used_events - listed}"


# --- what the exporter makes of a log record -----------------------------------------------------

@pytest.fixture
def exported():
    """An OpenTelemetry logging handler on the root logger, as the worker attaches it, whose
    records are converted the way the Azure Monitor exporter sends them."""
    from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from shared import telemetry

    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    handler = LoggingHandler(logger_provider=provider)
    root = logging.getLogger()
    names = telemetry.APP_LOGGERS + telemetry.QUIET_LOGGERS + ("shared.flows.sync.run", "shared.web.api")
    levels = {name: logging.getLogger(name).level for name in names} | {"": root.level}
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the worker's level
    try:
        yield lambda: [(_convert_log_to_envelope(record), record.log_record) for record in memory.get_finished_logs()]
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        provider.shutdown()


def test_extra_keys_become_custom_dimensions_as_is_and_exceptions_go_to_exceptions(exported):
    log = logging.getLogger("shared.flows.sync.run")
    log.info("sync run %s %s", "r1", "succeeded", extra={
        "event": "sync_run_finished", "run_id": "r1", "outcome": "succeeded", "count_seconds": 1.25,
        "count_fetched": 3})
    logging.getLogger("shared.storage.leases").warning("lease", extra={"event": "lease_renewal_failed", "lost": False})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("shared.web.api").exception("x failed", extra={"event": "http_failed", "function": "x"})
    sent = {envelope.data.base_data.properties["event"]: envelope for envelope, _ in exported()}
    finished = sent["sync_run_finished"]
    assert finished.data.base_type == "MessageData"  # the traces table
    assert {"event": "sync_run_finished", "run_id": "r1", "outcome": "succeeded", "count_seconds": "1.25",
            "count_fetched": "3"}.items() <= finished.data.base_data.properties.items()
    assert sent["lease_renewal_failed"].data.base_data.properties["lost"] == "False"  # tobool() reads it
    failed = sent["http_failed"]
    assert failed.data.base_type == "ExceptionData"  # the exceptions table
    assert failed.data.base_data.properties["function"] == "x"
    assert failed.data.base_data.exceptions[0].type_name == "RuntimeError"


# --- which loggers are exported ------------------------------------------------------------------

def test_configure_logging_keeps_sdk_http_logging_out_and_the_app_in(exported):
    from shared.telemetry import configure_logging

    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.INFO)
    assert configure_logging() is True
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").info("Request URL: 'https://x'")
    logging.getLogger("azure.storage.queue._queue_client").info("queue noise")
    logging.getLogger("azure.monitor.opentelemetry.exporter.export._base").info("Transmission succeeded")
    logging.getLogger("msal.token_cache").info("token cache noise")
    logging.getLogger("httpx").info("HTTP Request: GET https://x")
    logging.getLogger("urllib3.connectionpool").debug("Starting new HTTPS connection")
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").warning("sdk warning")
    logging.getLogger("msal.application").error("msal error")
    logging.getLogger("shared.flows.sync.run").info("app info", extra={"event": "sync_skipped", "trigger": "timer"})
    logging.getLogger("function_app").info("function app info")
    bodies = [record.body for _, record in exported()]
    assert bodies == ["sdk warning", "msal error", "app info", "function app info"]


def test_configure_logging_leaves_third_party_loggers_alone_without_an_exporter():
    from shared import telemetry

    names = telemetry.APP_LOGGERS + telemetry.QUIET_LOGGERS
    levels = {name: logging.getLogger(name).level for name in names}
    assert not telemetry.exporting()
    try:
        logging.getLogger("azure").setLevel(logging.NOTSET)
        assert telemetry.configure_logging() is False
        assert logging.getLogger("azure").level == logging.NOTSET
        assert logging.getLogger("shared").level == logging.getLogger("function_app").level == logging.INFO
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_configure_logging_reads_no_setting_and_works_with_an_empty_environment():
    script = ("import sys, shared.telemetry as t; t.configure_logging(); t.configure_logging(); "
              "assert 'shared.settings' not in sys.modules, 'settings were read'")
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={}, capture_output=True,  # noqa: S603
                             text=True, timeout=60)
    assert process.returncode == 0, process.stderr


def test_function_app_configures_logging_once_at_import():
    tree = ast.parse((ROOT / "function_app.py").read_text(encoding="utf-8"))
    calls = [node for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and ast.unparse(node.value.func) == "configure_logging"]
    assert len(calls) == 1
    assert any(isinstance(node, ast.ImportFrom) and node.module == "shared.telemetry" for node in tree.body)
