"""Where a study lives: SQLite in the tune directory by default, or any SQLAlchemy URL (PostgreSQL,
MySQL) that several machines share. Trials report a heartbeat, so a trial whose process died is
failed after the grace period and its place in the N trials is taken again."""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from trustmatch.core.errors import UserError

HEARTBEAT_S = 30
GRACE_S = 120
CREATE_ATTEMPTS = 4


def default_url(tune_dir: Path) -> str:
    return f"sqlite:///{(tune_dir / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage at ``url``, connected (its tables made); one line where it cannot be reached."""
    import sqlalchemy.exc

    # SQLite: several processes wait on each other's writes rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
            # workers starting together on a new database race to create its tables: the loser retries
            attempt += 1
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "locked" in str(e)
            if not racing or attempt == CREATE_ATTEMPTS:
                raise UserError(_unreachable(url, e)) from None
            time.sleep(attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as e:
            raise UserError(_unreachable(url, e)) from None


def _unreachable(url: str, e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (
        f"cannot reach --storage {url!r} ({reason}): check the URL, the server and its driver "
        "(e.g. postgresql://user:pass@host/db needs psycopg2)"
    )
