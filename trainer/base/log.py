"""One line per event, rank-aware: only rank 0 speaks unless LATENTVERSE_LOG_ALL_RANKS=1."""
import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        # Messages are folded to one line so logs stay greppable.
        if isinstance(record.msg, str) and "\n" in record.msg:
            record.msg = record.msg.replace("\n", " | ")
        if record.levelno >= logging.WARNING or rank() == 0:
            return True
        return os.environ.get("LATENTVERSE_LOG_ALL_RANKS", "0") == "1"


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("latentverse")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("LATENTVERSE_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name)
