"""The agent process: one background process per open session, and its client.

``agent open`` starts it detached; it holds the lock heartbeat, the watcher and the
uploader, and answers ``status``, ``flush``, ``close`` and ``abort`` over a private
control channel (a Unix socket, a named pipe on Windows).

May import: ``agent.session`` and everything below it. Never ``agent.cli`` or ``agent.qt``.
"""
