"""Where the study lives: one string that both the sweeper and every job can open.

The string travels to each job as the override `trial.storage=...`, so it must mean the
same thing in any process on any machine that sees the same files:

- an Optuna RDB URL (`sqlite:///...`, `postgresql://...`, `mysql+pymysql://...`);
- `redis://...`: an Optuna journal kept in Redis (needs the `redis` package);
- anything else is a file path: an Optuna journal file, safe for several processes on one
  file system (it locks with symlinks, so NFS works too). This is the default, kept in the
  sweep directory.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

from detr_train.search.errors import SearchConfigError

log = logging.getLogger(__name__)

DEFAULT_JOURNAL_NAME = "optuna_journal.log"


def resolve_storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The storage string jobs will receive: the default journal file, or the user's, made absolute.

    Relative paths (and relative SQLite files) are resolved now, because a job may run in
    another working directory (`hydra.job.chdir=true`, a cluster node).
    """
    if not storage:
        return str(Path(sweep_dir).resolve() / DEFAULT_JOURNAL_NAME)
    storage = str(storage)
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        relative = storage[len("sqlite:///") :]
        if relative and relative != ":memory:" and not relative.startswith(("file:", "?")):
            return "sqlite:///" + str(Path(relative).resolve())
    if "://" not in storage:
        return str(Path(storage).expanduser().resolve())
    return with_installed_postgres_driver(storage)


def with_installed_postgres_driver(url: str) -> str:
    """A bare `postgresql://` URL made explicit about the driver that is installed here.

    SQLAlchemy 2.0 reads a bare URL as psycopg2, 2.1 as psycopg 3: naming whichever
    driver is importable makes `postgresql://...` work with either, and every job then
    receives the same explicit URL.
    """
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            for module, dialect in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
                if importlib.util.find_spec(module) is not None:
                    return dialect + url[len(bare) :]
    return url


def open_storage(url: str) -> BaseStorage:
    """Open (and for files, create) the storage, or fail with a message that names it.

    RDB storages connect here, so an unreachable database fails before any trial starts.
    """
    try:
        if url.startswith("redis://") or url.startswith("rediss://"):
            return JournalStorage(JournalRedisBackend(url))
        if "://" in url:
            return _open_rdb(url)
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as error:  # noqa: BLE001 - every backend fails in its own way; all are fatal here
        cause = f"{type(error).__name__}: {error}"
        if error.__cause__ is not None:
            cause += f" ({type(error.__cause__).__name__}: {error.__cause__})"
        if isinstance(error, ImportError) and url.startswith("postgresql"):
            cause += "; install a PostgreSQL driver: pip install -e '.[postgres]'"
        raise SearchConfigError(f"Cannot open the Optuna storage {redact(url)}: {cause}") from error


def _open_rdb(url: str) -> RDBStorage:
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url = with_installed_postgres_driver(url)
    try:
        return RDBStorage(url)
    except (IntegrityError, ProgrammingError):
        # Sweeps started together on an empty database (several machines, one command) all
        # create Optuna's tables; the losers fail with "already exists". A moment later the
        # tables are there and a second try just opens them. Connection errors are not retried.
        log.info("Optuna's tables were being created by another process; opening %s again", redact(url))
        time.sleep(1.0)
        return RDBStorage(url)


def count_trials(storage: BaseStorage, study_name: str) -> int:
    """How many trials a stored study already has (0 when the study does not exist yet)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def redact(url: str) -> str:
    """The URL with any password hidden, for logs and error messages."""
    if "://" not in url or "@" not in url:
        return f"'{url}'"
    try:
        from sqlalchemy.engine import make_url

        return f"'{make_url(url).render_as_string(hide_password=True)}'"
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (e.g. redis): hide the whole credential part
        scheme, rest = url.split("://", 1)
        return f"'{scheme}://***@{rest.rsplit('@', 1)[1]}'"

