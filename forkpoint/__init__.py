"""forkpoint: checkpoint a Python program's whole memory in about a millisecond, roll back on failure.

A checkpoint is a frozen copy-on-write fork of the program; restoring wakes it. See
docs/architecture.md for the process model.
"""
from __future__ import annotations

from ._errors import (
    ArenaFull,
    CacheCorrupted,
    ConfigurationError,
    ForkpointError,
    NoSuchCheckpoint,
    NotStarted,
    Quarantined,
    Recovered,
    RegionMismatch,
    ResourceExhausted,
    ThreadsAlive,
    WrongThread,
)
from .checkpointed import checkpointed
from .persist import (
    IN,
    OUT,
    HistoryRecord,
    PersistentInt,
    cache,
    history,
    persist,
    persist_array,
    persist_int,
    persist_struct,
)
from .recovery import is_quarantined, processing, quarantine, quarantined, release
from .snapshots import (
    CHKPT_RECOVERED,
    CKPT_FROM_STATE,
    CKPT_NUMCHKPTS,
    CKPT_SIGTYPE,
    CKPT_TO_STATE,
    FATAL_SIGNALS,
    CheckpointInfo,
    checkpoints,
    chkpt_status,
    configure,
    current_state,
    discard,
    recover_on,
    recovery_seconds,
    restore_reason,
    shepherd_pid,
    start,
    tlongjmp,
    tsetjmp,
)
from .watchdog import watchdog

__version__ = "0.1.0"

# No NullHandler on logger "forkpoint": until the application configures logging, its warnings
# (one line per recovery) reach stderr through logging's last-resort handler, as a crash would have.

__all__ = [
    "ArenaFull", "CacheCorrupted", "ConfigurationError", "ForkpointError", "NoSuchCheckpoint",
    "NotStarted", "Quarantined", "Recovered", "RegionMismatch", "ResourceExhausted", "ThreadsAlive",
    "WrongThread",
    "IN", "OUT", "HistoryRecord", "PersistentInt", "cache", "history", "persist", "persist_array",
    "persist_int", "persist_struct", "is_quarantined", "processing", "quarantine", "quarantined",
    "release", "watchdog", "CHKPT_RECOVERED", "CKPT_FROM_STATE", "CKPT_NUMCHKPTS", "CKPT_SIGTYPE",
    "CKPT_TO_STATE", "FATAL_SIGNALS", "CheckpointInfo", "checkpoints", "chkpt_status", "configure",
    "current_state", "discard", "recover_on", "recovery_seconds", "restore_reason", "shepherd_pid",
    "start", "tlongjmp", "tsetjmp", "checkpointed", "__version__",
]
