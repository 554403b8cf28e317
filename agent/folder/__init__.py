"""The working folder on this machine: watching, snapshots, ignore rules, journal, streamer.

Everything local: the watcher (its observer the only watchdog importer), snapshots and their
difference, the ignore rules, the durable change journal, the streamer that sends
changed content, transfers into and out of the folder, the cache of committed copies,
and the merge plan used on resume.

May import: ``agent.store`` and the foundations. Never ``agent.stage``,
``agent.session`` or a front door.
"""
