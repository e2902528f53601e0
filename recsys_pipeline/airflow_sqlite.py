"""Connections of the embedded Airflow's SQLite database: every writing transaction waits its turn.

Airflow's ``[database] sql_alchemy_connect_args`` names :data:`CONNECT_ARGS`. The scheduler, the
DAG processor, the API server and a command such as ``airflow backfill create`` write to the one
file at once. SQLite makes a transaction that read first and then writes fail at once with
"database is locked" when another connection holds the write lock, whatever the busy timeout: it
cannot wait without risking a deadlock. Airflow opens such transactions (a savepoint, a read, an
insert), so a backfill created while the scheduler ran failed now and then. Here a transaction
takes the write lock when it begins (``BEGIN IMMEDIATE``, which does wait) if its first statement
writes or opens a savepoint; reads outside a transaction stay as sqlite3 runs them.
"""

from __future__ import annotations

import sqlite3
from typing import Any

# sqlite3's default wait for another connection's lock, 5 s, is too short on a busy machine.
BUSY_TIMEOUT_S = 60
_BEGINS_WRITING = ("INSERT", "UPDATE", "DELETE", "REPLACE", "SAVEPOINT")


def _begins_writing(statement: str) -> bool:
    return statement.lstrip().upper().startswith(_BEGINS_WRITING)


class WriteLockingCursor(sqlite3.Cursor):
    """A cursor whose connection takes the write lock before a transaction's first write."""

    def _lock_for(self, statement: str) -> None:
        # isolation_level None is autocommit (sqlite3 opens no transaction there either).
        idle = self.connection.isolation_level is not None and not self.connection.in_transaction
        if idle and _begins_writing(statement):
            super().execute("BEGIN IMMEDIATE")

    def execute(self, statement: str, parameters: Any = (), /) -> WriteLockingCursor:
        self._lock_for(statement)
        return super().execute(statement, parameters)

    def executemany(self, statement: str, seq_of_parameters: Any, /) -> WriteLockingCursor:
        self._lock_for(statement)
        return super().executemany(statement, seq_of_parameters)


class WriteLockingConnection(sqlite3.Connection):
    """A sqlite3 connection whose cursors are :class:`WriteLockingCursor`."""

    def cursor(self, factory: Any = WriteLockingCursor) -> Any:
        return super().cursor(factory)


CONNECT_ARGS: dict[str, Any] = {"timeout": BUSY_TIMEOUT_S, "factory": WriteLockingConnection}
