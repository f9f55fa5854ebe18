"""Everything altrack says to and reads from MLflow, in three modules.

- ``tags``: every tag, attribute and run kind, named once.
- ``runs``: the write side (parent and child runs, params, metrics, artifacts, models, liveness).
- ``query``: the read side (runs back as result rows, finished runs by config hash).

The commands built on them live beside this package: ``grid``, ``replay``, ``paper``, ``sweep``.
"""
