"""``python tests/rank_metrics.py OUT var-args...``: the var CLI, recording every process's per-step metrics.

Used by test_multiprocess.py under ``accelerate launch``: each process writes OUT/rank<i>.json (one dict of
metrics per micro-batch), so the test can check that the logged values are the mean over processes.  Only
observes: the training itself is the unchanged CLI.
"""

import json
import os
import sys
from pathlib import Path

from var.cli import main
from var.train.loop import Trainer

RECORDS: list[dict[str, float]] = []
_prepare = Trainer.prepare


def _prepare_and_record(self, *models):
    _prepare(self, *models)
    step = self.train_step

    def recorded(images, labels):
        metrics = step(images, labels)
        RECORDS.append({key: float(value) for key, value in metrics.items()})
        return metrics

    self.train_step = recorded


if __name__ == "__main__":
    out = Path(sys.argv[1])
    Trainer.prepare = _prepare_and_record
    try:
        main(sys.argv[2:])
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(RECORDS))
