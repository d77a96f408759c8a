"""The terminal's mode at a checkpoint, set again when the checkpoint is restored.

A terminal's mode (``termios``: raw or cooked, echo, what Ctrl-C does) belongs to the terminal, not
to the process, so a rollback does not turn it back: a program restored to before its
``tty.setraw()`` found the terminal still raw (no echo; Enter and Ctrl-C did nothing) while its
memory held it cooked. A line editor such as prompt_toolkit, which saves the mode it finds before
it goes raw and puts it back at exit, then saved the raw mode and left the terminal raw after the
program ended.

So ``tsetjmp()`` reads the mode of each terminal among descriptors 0-2 (one ``ioctl``; a character
device that is no terminal, ``/dev/null``, is remembered and not asked again), and the restored
process sets it again before any program code runs, if it changed. Only while the program is
the terminal's foreground job: a job in the background must not change the mode under the shell,
or whatever now runs in the foreground.
"""
from __future__ import annotations

import logging
import os
import termios

log = logging.getLogger("forkpoint")

__all__ = ["Mode", "at_checkpoint", "restore"]

Mode = tuple[int, int, list]            # descriptor, the terminal's device number, tcgetattr()

_not_terminals: set[int] = set()        # device numbers of character devices that are not ttys


def at_checkpoint(devices: dict[int, int]) -> tuple[Mode, ...]:
    """The mode of each terminal among ``devices`` (descriptor -> device number of those of 0-2
    that are character devices), once per terminal."""
    modes: list[Mode] = []
    for fd, dev in devices.items():
        if dev in _not_terminals or any(m[1] == dev for m in modes):
            continue
        try:
            modes.append((fd, dev, termios.tcgetattr(fd)))
        except termios.error:
            _not_terminals.add(dev)
    return tuple(modes)


def restore(modes: tuple[Mode, ...], pgid: int) -> None:
    """Set each terminal's mode back to ``modes`` where it changed, if the program (process group
    ``pgid``) is its foreground job. Called with every signal blocked (a background write of the
    mode would otherwise stop the process with SIGTTOU); what fails is logged, never raised."""
    for fd, dev, mode in modes:
        try:
            if os.fstat(fd).st_rdev != dev or os.tcgetpgrp(fd) != pgid:
                continue
        except OSError:     # closed or replaced since, or not the session's terminal: not ours
            continue
        try:
            if termios.tcgetattr(fd) != mode:
                termios.tcsetattr(fd, termios.TCSANOW, mode)
                log.info("restored the terminal's mode on descriptor %d as it was at the checkpoint", fd)
        except (OSError, termios.error) as e:
            log.warning("could not restore the terminal's mode on descriptor %d: %s", fd, e)
