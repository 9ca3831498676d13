"""Recorded state: nodes and their lifecycle, runs, events, burn-in results, locks.

SQLAlchemy Core over SQLite (a file beside the spec, the default) or PostgreSQL (psycopg 3).
One transition table (:mod:`~provisioner.state.lifecycle`) and one function that moves a node
(:meth:`Store.move`); locks that hold across processes and machines
(:mod:`~provisioner.state.locks`); a versioned schema (:mod:`~provisioner.state.migrations`).
The store never receives a BMC credential. Import from the modules: ``store`` (``open_store``,
``Store``), ``lifecycle`` (``State``, ``can_move``), ``locks`` (``fleet_lock``, ``node_lock``).
"""
