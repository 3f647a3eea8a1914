"""The MLflow store: tracking URIs, the client, experiments."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

import mlflow
from mlflow.exceptions import MlflowException

from freetf.config import Config
from freetf.files import lock_file

logger = logging.getLogger(__name__)

# The experiment tag MLflow 3 reads for the experiment's kind (mlflow/server/js:
# ExperimentKind.CUSTOM_MODEL_DEVELOPMENT); GenAI experiments carry "genai_development".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# Over HTTP, MLflow's default of 7 retries with backoff stalls each failing call ~4 min;
# tracking must not stall training that long. Used only when the user has not set these.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# The experiment-tag prefix of the runs page's saved and shared views in MLflow 3.17's UI
# (mlflow/server/js: EXPERIMENT_PAGE_VIEW_STATE_SHARE_TAG_PREFIX); a view's id follows it.
SAVED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_ID = re.compile(r"[A-Za-z0-9_-]+")


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; raised at start, before any training."""


# ----------------------------------------------------------------------------- URIs


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db.

    Local stores are made absolute against the current directory, since Ray workers
    run in other directories: ``sqlite:///<abs cwd>/mlflow.db`` by default.
    """
    uri = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    scheme = urlparse(uri).scheme
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:" and not db.startswith("/"):
            return f"sqlite:///{Path(db).resolve()}"
    elif scheme == "file":
        path = uri[len("file:"):]
        if not path.startswith("//"):  # file:relative/path
            return Path(path).resolve().as_uri()
    elif not scheme:  # a bare path is a file store to MLflow
        return Path(uri).resolve().as_uri()
    return uri


def check_store_shared_by(uri: str, hosts: set[str]) -> None:
    """Raise :class:`TrackingError` if ``uri`` is a file on this machine (sqlite, a file
    store) while the Ray cluster spans several ``hosts``: rank 0 and the sweep's trials
    may run on another host, where that file is not the driver's."""
    if len(hosts) <= 1 or urlparse(uri).scheme not in ("sqlite", "file", ""):
        return
    raise TrackingError(
        f"tracking.mlflow.tracking_uri={uri} is a file on this machine, but the Ray cluster "
        f"spans {len(hosts)} hosts ({', '.join(sorted(hosts))}); start an MLflow server "
        f"every node reaches (`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "
        f"sqlite:///mlflow.db`) and set tracking.mlflow.tracking_uri=http://<that host>:5000")


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingError` if an http(s) tracking server does not answer /health.

    A no-op for local stores (sqlite, file) and other schemes.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # reachable; credentials are the client's business
            return
        reason = f"GET {url} answered HTTP {err.code}; is this an MLflow tracking server?"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = f"GET {url} failed: {getattr(err, 'reason', err)}"
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. "
        f"`mlflow server --host 127.0.0.1 --port 5000`), point tracking.mlflow.tracking_uri "
        f"or MLFLOW_TRACKING_URI at a running server or a sqlite:/// file, or set "
        f"tracking.mlflow.enabled=false.")


def preload_store_modules() -> None:
    """Import what the first client of a database store imports: MLflow's SQLAlchemy
    store (its ORM) and the alembic modules of its schema check (about 2 s on 2 cores)."""
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


class _ReraisedDatabaseErrors(logging.Filter):
    """MLflow's SQLAlchemy store logs every database error with its traceback and then
    raises it to the caller (``mlflow.store.db.utils``: a full disk gave one traceback per
    metric batch).  freetf's callers say what failed, in one line: the log is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


_DB_LOGGER = "mlflow.store.db.utils"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store, or None."""
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return Path(db) if db and db != ":memory:" else None


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error in one line: MLflow's database errors carry the SQL and every bound
    parameter (a thousand metrics) after their first line."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def root_cause(err: BaseException) -> str:
    """The error at the bottom of ``err``'s chain, in one line: MLflow wraps a database
    error in SQLAlchemy's ("raised as a result of Query-invoked autoflush ...") wrapped in
    its own; the bottom one says ``OperationalError: database or disk is full``."""
    root = err
    while (below := root.__cause__ or root.__context__) is not None and below is not root:
        root = below
    return f"{type(root).__name__}: {first_line(root)}"


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    """An MlflowClient for ``uri``, preparing local stores (sqlite folder, file opt-in); a
    sqlite store is opened under its :func:`schema_lock`."""
    db_logger = logging.getLogger(_DB_LOGGER)
    if not any(isinstance(f, _ReraisedDatabaseErrors) for f in db_logger.filters):
        db_logger.addFilter(_ReraisedDatabaseErrors())
    scheme = urlparse(uri).scheme
    if scheme == "file":
        # MLflow 3.x refuses file stores unless opted in; a file: URI is an explicit ask.
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            logger.info("using the file store %s: setting MLFLOW_ALLOW_FILE_STORE=true", uri)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    elif (db := sqlite_file(uri)) is not None:
        if db.is_absolute():
            db.parent.mkdir(parents=True, exist_ok=True)
        with schema_lock(db):
            return mlflow.MlflowClient(tracking_uri=uri)
    elif scheme in ("http", "https"):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return mlflow.MlflowClient(tracking_uri=uri)


@contextmanager
def schema_lock(db: Path) -> Iterator[None]:
    """Hold ``<db>.lock`` (beside the sqlite file ``db``) while a client opens the store.

    A process's first client of a store creates the schema of a new file, or upgrades an
    old one (MLflow's alembic migrations, a few seconds); two processes doing it at once
    break one of them (``table alembic_version already exists``, ``duplicate column name:
    step``), as two sweeps started at once on a new ``mlflow.db`` did.  Later clients in
    the process reuse MLflow's cached store and hold the lock for a moment.
    Where no lock can be taken (not POSIX, a file system without locks, a folder this
    process may not write) the store is opened without it.
    """
    try:
        fd = lock_file(db.with_name(f"{db.name}.lock"))
    except (NotImplementedError, OSError) as err:
        logger.debug("opening %s without its schema lock: %s", db, err)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _experiment_id(client: mlflow.MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, creating it (or restoring it if deleted), marked
    as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`) unless it says otherwise."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=_artifact_location(uri),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
            return experiment_id
        except MlflowException as err:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before freetf set the tag
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                  MODEL_TRAINING_KIND)
    return experiment.experiment_id


def runs_page_url(experiment_id: str, ui: str = "http://127.0.0.1:5000",
                  search_filter: str | None = None, view: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment, in the model-training view.

    MLflow 3.17's UI picks the view from the ``workflowType`` URL parameter (and then
    remembers it in the browser), not from the experiment tag: without it an experiment
    opens on the GenAI traces overview.  ``view``: a saved view's id
    (:func:`save_runs_view`), which the UI opens with its filter and columns; the URL
    itself carries a filter and an order, never the columns.
    """
    if search_filter and view:
        raise ValueError("a saved view carries its own filter: give search_filter or view")
    query = {"workflowType": "machine_learning"}
    if search_filter:
        query["searchFilter"] = search_filter
    if view:
        query["viewStateShareKey"] = view
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def runs_column(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it: ``params.`seed```,
    ``metrics.`eval/kl_bits```, ``tags.`freetf.verdict```."""
    if kind not in ("attributes", "params", "metrics", "tags"):
        raise ValueError(f"a runs-table column is attributes, params, metrics or tags, "
                         f"not {kind!r}")
    return f"{kind}.`{name}`"


def save_runs_view(client, experiment_id: str, view_id: str, name: str,
                   columns: list[str], search_filter: str | None = None,
                   group_by_tag: str | None = None) -> str:
    """Save a view of the runs table (its columns, filter and grouping) as MLflow 3.17's UI
    saves one (**Views** > **Save as new view**, or **Share**): the experiment tag
    ``mlflow.sharedViewState.<view_id>`` holding ``{name, createdAt, updatedAt, state}``,
    ``state`` the page's state as JSON (columns from :func:`runs_column`; ``group_by_tag``:
    the runs grouped by that tag's value, each group open, as **Group by** does).  The UI
    lists it under **Views** by ``name`` and opens it from :func:`runs_page_url`
    (``view=``); saving the same ``view_id`` again replaces it.  Returns ``view_id``."""
    if not VIEW_ID.fullmatch(view_id):
        raise ValueError(f"view id {view_id!r}: letters, digits, '-' and '_' only")
    state: dict[str, Any] = {"selectedColumns": list(columns)}
    if search_filter:
        state["searchFilter"] = search_filter
    if group_by_tag:
        state["groupBy"] = f"tag.average.{group_by_tag}"  # the UI's <mode>.<aggregate>.<key>
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now,
                "state": json.dumps(state, separators=(",", ":"))}
    client.set_experiment_tag(experiment_id, f"{SAVED_VIEW_TAG}{view_id}", json.dumps(envelope))
    return view_id


def _artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (not under the cwd)."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):].startswith("/"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as err:
        logger.debug("ignored during cleanup: %s", err)


def end_active_run() -> None:
    """End a fluent ``mlflow`` run left active in this process (freetf uses clients, but a
    reused sweep process may run user code that started one)."""
    if mlflow.active_run() is not None:
        logger.warning("ending the MLflow run %s left active in this process",
                       mlflow.active_run().info.run_id)
        mlflow.end_run()
