"""What a stage is in the bucket: keys, manifest, lock, conditional writes, commit, history.

The bucket protocol (DESIGN.md "Key layout", "Commit", "Lock"): pure key and manifest
functions, the stage lock and its heartbeat, conditional writes whose answer may be
lost, the commit intent and its steps, version history, the plain-tree repair and the
lock board.

May import: ``agent.store`` and the foundations (``agent.errors``, ``agent.config``,
``agent.log``, ...). Never ``agent.folder``, ``agent.session`` or a front door.
"""
