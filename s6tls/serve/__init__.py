"""Serving a connection, and the servers' process model.

``connection`` holds a started program's ``Setup`` and serves one
connection through ``tunnel`` (handshake, spawn, pump, status), which
starts the application with ``app``; ``privileges`` drops to the ids asked
for.  ``forkserver`` is the loop s6-tlsserver and s6-dtlsserver share, with
its ``spare`` child.
"""
