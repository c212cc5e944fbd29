"""Where a study lives: SQLite in the tune directory by default, or any SQLAlchemy URL (PostgreSQL,
MySQL) that several machines share. Trials report a heartbeat, so a trial whose process died is
failed after the grace period and its place in the N trials is taken again.

A shared URL usually holds a password, so it may come from ``TRUSTMATCH_STORAGE`` instead of the
command line (shell history, the process list), and it is only ever shown through ``shown``."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import optuna

from trustmatch.core.errors import UserError

HEARTBEAT_S = 30
GRACE_S = 120
CREATE_ATTEMPTS = 4
ENV = "TRUSTMATCH_STORAGE"
HIDDEN = "***"


def default_url(tune_dir: Path) -> str:
    return f"sqlite:///{(tune_dir / 'study.db').resolve()}"


def storage_url(flag: str | None) -> tuple[str | None, str]:
    """(URL, where it came from): ``--storage`` wins over ``TRUSTMATCH_STORAGE``; (None, "") for neither."""
    if flag:
        return flag, "--storage"
    url = os.environ.get(ENV, "").strip()  # an empty variable is an unset one, as in most tools
    return (url, ENV) if url else (None, "")


def shown(url: str) -> str:
    """``url`` as it may be printed or written: its password replaced by ``***``."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    if url.count("@") < 2:  # two: an unescaped '@' in the password, which SQLAlchemy would cut in two
        try:
            return make_url(url).render_as_string(hide_password=True)
        except (sqlalchemy.exc.ArgumentError, ValueError):  # unparsable (e.g. a port that is no number)
            pass
    # everything between the user's colon and the last '@': too much hidden is safe, too little is not
    return re.sub(r"^([^:/]+://[^:/@]*:).*@", rf"\g<1>{HIDDEN}@", url)


def _passwords(url: str) -> set[str]:
    """The password as the URL spells it and as SQLAlchemy decodes it (``%40`` is ``@``)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    found = re.match(r"^[^:/]+://[^:/@]*:(.*)@", url)
    forms = {found.group(1)} if found else set()
    try:
        forms.add(make_url(url).password or "")
    except (sqlalchemy.exc.ArgumentError, ValueError):
        pass
    return forms - {""}


def open_storage(url: str, source: str = "--storage") -> optuna.storages.RDBStorage:
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
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as e:
            # workers starting together on a new database race to create its tables: the loser retries
            attempt += 1
            # ("database is locked", or a table "already exists" that the other made between check and create)
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or any(
                sign in str(e) for sign in ("locked", "already exists")
            )
            if not racing or attempt == CREATE_ATTEMPTS:
                raise UserError(_unreachable(url, source, e)) from None
            time.sleep(attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as e:
            raise UserError(_unreachable(url, source, e)) from None


def _unreachable(url: str, source: str, e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    reason = reason.replace(url, shown(url))  # a driver's message may repeat the URL or the password
    for password in _passwords(url):  # as a whole word only: a password "p" leaves "psycopg2" alone
        reason = re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", HIDDEN, reason)
    return (
        f"cannot reach {source} {shown(url)!r} ({reason[:200]}): check the URL, the server and its driver "
        "(e.g. postgresql://user:pass@host/db needs psycopg2)"
    )
