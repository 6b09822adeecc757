"""Progress bars per stage (prepare / generate / score) and the run log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

STAGES = ("prepare", "generate", "score")


class StageProgress:
    """One tqdm bar per stage with done/total and ETA; silent with ``quiet``. When stderr is not
    a terminal (a redirected log), plain lines instead of bars: no carriage returns or escape
    codes, one line per stage at every further tenth of its total."""

    def __init__(self, totals: dict[str, int], quiet: bool = False, stream=None):
        self.bars = {}
        self.stream = stream or sys.stderr
        self.plain: dict[str, list[int]] = {}  # stage -> [done, total, next tenth to report]
        if quiet:
            return
        if not getattr(self.stream, "isatty", lambda: False)():
            self.plain = {stage: [0, totals[stage], 1] for stage in STAGES if totals.get(stage)}
            return
        for position, stage in enumerate(s for s in STAGES if totals.get(s)):
            self.bars[stage] = tqdm(
                total=totals[stage], desc=f"{stage:8s}", unit="unit", position=position,
                leave=True, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
            )

    def __call__(self, stage: str, n: int) -> None:
        bar = self.bars.get(stage)
        if bar is not None:
            bar.update(n)
        line = self.plain.get(stage)
        if line is not None and n:
            line[0] += n
            done, total, tenth = line
            if total and done * 10 >= tenth * total:
                print(f"{stage}: {done}/{total} ({100 * done // total}%)", file=self.stream, flush=True)
                line[2] = done * 10 // total + 1

    def set_total(self, stage: str, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is not None:
            bar.total = total
            bar.refresh()
        if stage in self.plain:
            self.plain[stage][1] = total

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def worker_logging(log_path: Path, name: str) -> None:
    """A worker process's records (what it prepared, resumed, failed) appended to the run's log
    under ``name``: the driver's handlers do not cross into a spawned process, whose INFO records
    were otherwise dropped. Warnings also go to stderr, as the driver's do."""
    import multiprocessing

    multiprocessing.current_process().name = name
    logger = logging.getLogger("subjectbench")
    if any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        return  # this process already logs (the in-process executor, or a second call)
    logger.setLevel(logging.INFO)
    try:
        file_handler = logging.FileHandler(log_path, encoding="utf-8")  # append: one line per write
    except OSError:  # a run folder this process cannot reach: its warnings still reach stderr
        return
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(message)s"))
    logger.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(console)
    logger.propagate = False


def setup_logging(log_path: Path, quiet: bool) -> logging.Logger:
    logger = logging.getLogger("subjectbench")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(message)s"))
    logger.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(console)
    logger.propagate = False
    return logger
