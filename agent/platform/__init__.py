"""Everything that differs between Windows and POSIX lives here (and only here).

Machine identity, process liveness, private file permissions, detaching a
background process, and the termination signals a crash handler listens to. The
names are imported from here (``from agent.platform import ...``); they live in
``files`` (private files and folders, the executable bit, case folding),
``processes`` (machine name, pid liveness, detached start, ending at once),
``termination`` (signal handlers, the wake-up fd, the Windows console handler)
and ``channel`` (the control socket or named pipe, the peer's uid).
"""

from __future__ import annotations

import sys

IS_WINDOWS = sys.platform == "win32"

# The submodules read IS_WINDOWS from here, so they are imported after it.
from agent.platform.channel import (  # noqa: E402
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    PIPE_ACCESS_DUPLEX,
    PIPE_REJECT_REMOTE_CLIENTS,
    bind_control_socket,
    connect_control_socket,
    current_uid,
    peer_uid,
    windows_create_pipe,
    windows_pipe_name,
    windows_pipe_sddl,
)
from agent.platform.files import (  # noqa: E402
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    check_private_dir,
    create_private_file,
    ensure_private_dir,
    executable_bit,
    folds_case,
    fsync_dir,
    held_by_another_program,
    make_private_dirs,
    open_private_append,
    set_executable,
    write_private_file,
)
from agent.platform.processes import (  # noqa: E402
    CREATE_BREAKAWAY_FROM_JOB,
    CREATE_NEW_PROCESS_GROUP,
    DETACHED_PROCESS,
    detach_creationflags,
    exit_now,
    machine_name,
    pid_alive,
    spawn_detached,
    spawn_with_breakaway_fallback,
    windows_detach_flags,
)
from agent.platform.termination import (  # noqa: E402
    SignalHandler,
    at_threads_exit,
    current_handler,
    end_by_signal,
    forward_wakeup,
    install_console_handler,
    is_default_action,
    is_ignored,
    on_main_thread,
    open_wakeup_channel,
    peek_wakeup,
    set_handler,
    set_interrupt_handler,
    set_termination_handlers,
    swap_wakeup_fd,
    termination_signals,
    wake_main_thread,
)

__all__ = [
    "CREATE_BREAKAWAY_FROM_JOB",
    "CREATE_NEW_PROCESS_GROUP",
    "DETACHED_PROCESS",
    "FILE_FLAG_FIRST_PIPE_INSTANCE",
    "IS_WINDOWS",
    "PIPE_ACCESS_DUPLEX",
    "PIPE_REJECT_REMOTE_CLIENTS",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SignalHandler",
    "at_threads_exit",
    "bind_control_socket",
    "check_private_dir",
    "connect_control_socket",
    "create_private_file",
    "current_handler",
    "current_uid",
    "detach_creationflags",
    "end_by_signal",
    "ensure_private_dir",
    "executable_bit",
    "exit_now",
    "folds_case",
    "forward_wakeup",
    "fsync_dir",
    "held_by_another_program",
    "install_console_handler",
    "is_default_action",
    "is_ignored",
    "machine_name",
    "make_private_dirs",
    "on_main_thread",
    "open_private_append",
    "open_wakeup_channel",
    "peek_wakeup",
    "peer_uid",
    "pid_alive",
    "set_executable",
    "set_handler",
    "set_interrupt_handler",
    "set_termination_handlers",
    "spawn_detached",
    "spawn_with_breakaway_fallback",
    "swap_wakeup_fd",
    "termination_signals",
    "wake_main_thread",
    "windows_create_pipe",
    "windows_detach_flags",
    "windows_pipe_name",
    "windows_pipe_sddl",
    "write_private_file",
]
