"""Quiet terminal by default: `csr demo`, `csr run`, `csr sample` and `csr train-dpo` print their
stages and results; everything else lands in ``<output_dir>/logs/``.

- ``logs/csr.log``: this process's Python warnings and library logging (transformers, DeepSpeed,
  open_clip, Ray ...), with the stage lines as markers;
- ``logs/dpo.log`` (`csr train-dpo`) or ``logs/dpo_iter<t>.log`` (`csr run`, `csr demo`): the
  stdout and stderr of the launcher and of every DPO rank; when DPO fails its last lines are
  printed with the file's path;
- ``logs/ray_session``: with `csr sample --ray`, a link to the Ray session's logs (the actors').

What still reaches the terminal: errors from anyone, warnings from csr_plugin itself, tracebacks
that end the command (with the logs folder named). ``csr --verbose`` routes nothing: everything
is shown as it comes. Each run writes under its own output_dir, so runs never share a log file.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

LOG_FILE = "csr.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that libraries give their own terminal handler and no propagation (DeepSpeed's prints its
# accelerator warning at import): a filter on the logger itself hands their records to our file.
_OWN_HANDLER_LOGGERS = ("DeepSpeed",)


class _Buffer(logging.Handler):
    """Records logged before the output folder is known (warnings at import), written once it is."""

    def __init__(self, limit: int = 10000):
        super().__init__()
        self.records: deque = deque(maxlen=limit)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _TerminalFilter(logging.Filter):
    """In quiet mode the terminal gets errors from anyone and warnings from csr_plugin only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.WARNING and record.name.split(".")[0] == "csr_plugin")


class _ToLogFile(logging.Filter):
    """On a library logger that does not propagate: the record goes to our log file; only errors go on
    to the library's own (terminal) handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state.sink is not None:
            _state.sink.handle(record)
        return record.levelno >= logging.ERROR


class _State:
    def __init__(self):
        self.quiet = False                               # quiet_terminal() ran: route everything to files
        self.sink: Optional[logging.Handler] = None      # the buffer, then the file handler
        self.folder: Optional[Path] = None               # the logs folder in use
        self.announced: set = set()
        self.undo: list = []                             # what restore() puts back, last first


_state = _State()


def _terminal_handler(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def logs_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "logs"


def is_quiet() -> bool:
    return _state.quiet


def active_logs_dir() -> Optional[Path]:
    """The logs folder while quiet mode routes to one, else None."""
    return _state.folder if _state.quiet else None


def quiet_terminal() -> None:
    """Start quiet mode before the heavy imports: warnings and library logs are held until
    :func:`route_logs` names the folder, the terminal keeps errors and csr_plugin's warnings."""
    if _state.quiet:
        return
    _state.quiet = True
    undo = _state.undo
    # Transformers' "Loading weights" bars, one per model load, are not the stage's progress bar.
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        undo.append(lambda: os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None))
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in filter(_terminal_handler, root.handlers):
        terminal = _TerminalFilter()
        handler.addFilter(terminal)
        undo.append(lambda handler=handler, terminal=terminal: handler.removeFilter(terminal))
    level = root.level
    root.setLevel(logging.INFO)   # libraries' INFO lands in the file; the terminal filter drops it
    undo.append(lambda: root.setLevel(level))
    _state.sink = _Buffer()
    _state.sink.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(_state.sink)
    logging.captureWarnings(True)
    undo.append(lambda: logging.captureWarnings(False))
    for name in _OWN_HANDLER_LOGGERS:
        to_file = _ToLogFile()
        logging.getLogger(name).addFilter(to_file)
        undo.append(lambda name=name, to_file=to_file: logging.getLogger(name).removeFilter(to_file))
    _adopt_transformers_logging()


def _adopt_transformers_logging() -> None:
    """transformers logs through its own stderr handler without propagating: send it to the root."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001 - not installed or broken: nothing to adopt
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    bars = hf_logging.is_progress_bar_enabled()
    if bars and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":   # imported before quiet mode
        hf_logging.disable_progress_bar()

    def undo() -> None:
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
        if bars:
            hf_logging.enable_progress_bar()
    _state.undo.append(undo)


def restore() -> None:
    """Undo quiet mode: the file closed, the terminal and the libraries' loggers as they were (for
    callers of ``csr_plugin.cli.main`` in a longer-lived process, such as the tests)."""
    if not _state.quiet:
        return
    root = logging.getLogger()
    if _state.sink is not None:
        root.removeHandler(_state.sink)
        _state.sink.close()
    for undo in reversed(_state.undo):
        undo()
    _state.__init__()


def adopt_logger(name: str) -> None:
    """A library logger that prints through its own terminal handler without propagating (Ray's): in quiet
    mode its records go up to the root instead, so to csr.log, and only errors reach the terminal."""
    if not _state.quiet:
        return
    logger = logging.getLogger(name)
    removed, propagate = [h for h in logger.handlers if _terminal_handler(h)], logger.propagate
    for handler in removed:
        logger.removeHandler(handler)
    logger.propagate = True

    def undo() -> None:
        logger.propagate = propagate
        for handler in removed:
            logger.addHandler(handler)
    _state.undo.append(undo)


def link_folder(name: str, target: str | Path) -> Optional[Path]:
    """``logs/<name>`` -> ``target`` (a folder kept elsewhere, such as Ray's session logs); None if it fails."""
    folder = active_logs_dir()
    if folder is None:
        return None
    link = folder / name
    try:
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(Path(target), target_is_directory=True)
            return link
    except OSError:
        pass
    return None


def route_logs(output_dir: str | Path, verbose: bool = False, announce: bool = True) -> Optional[Path]:
    """Send warnings and library logs to ``<output_dir>/logs/csr.log``; returns that folder, or None
    with ``verbose`` (nothing is routed). Prints ``logs: <folder>/`` once per folder."""
    if verbose:
        return None
    quiet_terminal()
    folder = logs_dir(output_dir)
    if _state.folder != folder:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.handle(_record(logging.INFO, f"=== csr {' '.join(sys.argv[1:])} (pid {os.getpid()})"))
        root = logging.getLogger()
        old = _state.sink
        if isinstance(old, _Buffer):
            for record in old.records:
                handler.handle(record)
        if old is not None:
            root.removeHandler(old)
            old.close()
        root.addHandler(handler)
        _state.sink, _state.folder = handler, folder
    if announce and folder not in _state.announced:
        _state.announced.add(folder)
        print(f"logs: {folder}{os.sep}", flush=True)
    return folder


def _record(level: int, message: str, exc_info=None) -> logging.LogRecord:
    return logging.getLogger("csr").makeRecord("csr", level, __file__, 0, message, (), exc_info)


def note(message: str) -> None:
    """A line in csr.log only (stage markers between the libraries' messages)."""
    if _state.quiet and isinstance(_state.sink, logging.FileHandler):
        _state.sink.handle(_record(logging.INFO, message))


def say(message: str) -> None:
    """A stage line: on the terminal, and in csr.log as a marker in quiet mode."""
    print(message, flush=True)
    note(message)


def record_crash(exc: BaseException) -> None:
    """The traceback that ends the command, into csr.log too (Python prints it on the terminal)."""
    if _state.quiet and isinstance(_state.sink, logging.FileHandler):
        _state.sink.handle(_record(logging.ERROR, "the command ended with an exception",
                                   (type(exc), exc, exc.__traceback__)))


def subprocess_log(output_dir: str | Path, name: str) -> Optional[Path]:
    """``<output_dir>/logs/<name>.log`` for a child's output in quiet mode; None when verbose."""
    if not _state.quiet:
        return None
    return route_logs(output_dir) / f"{name}.log"


_EXCEPTION = re.compile(r"\b\w*(Error|Exception|Interrupt|Exit)\b")


def tail(path: str | Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log; progress-bar redraws (``\\r``) count as line ends.

    A failed torchrun log ends in the launcher's own traceback and failure summary; the rank's error
    is above it, in lines torch prefixes ``[rank<N>]:``. When those end in an exception, they are
    the lines shown.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    rows = [row.rstrip() for row in text.replace("\r", "\n").split("\n") if row.strip()]
    ranks = [i for i, row in enumerate(rows) if row.startswith("[rank")]
    if ranks and _EXCEPTION.search(rows[ranks[-1]]):
        return rows[max(0, ranks[-1] + 1 - lines):ranks[-1] + 1]
    return rows[-lines:]


def run_logged(command: list[str], log_file: str | Path, env: Optional[dict] = None, what: str = "the command",
               tail_lines: int = 20) -> int:
    """Run ``command`` with its stdout and stderr appended to ``log_file``; on a nonzero exit print the
    log's last lines and its path to stderr. Returns the exit code."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")   # the log is complete up to a crash, not a buffer behind
    with open(log_file, "ab") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    if code != 0:
        last = tail(log_file, tail_lines)
        print(f"{what} exited with code {code}; the end of its log (the rank's error when there is one):",
              file=sys.stderr)
        for row in last:
            print(f"  | {row}", file=sys.stderr)
        print(f"full log: {log_file}", file=sys.stderr, flush=True)
    return code
