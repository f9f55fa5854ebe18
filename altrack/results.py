"""Result rows: what tables, plots, statistics and resumes read about one protocol run.

A leaf module (no MLflow, no torch), so the report and the protocol can both use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from altrack.settings import PAPER_SETTING_LABEL

# Run statuses, spelled as MLflow spells them (``mlflow.entities.RunStatus``).
FINISHED = "FINISHED"
FAILED = "FAILED"
RUNNING = "RUNNING"
KILLED = "KILLED"


@dataclass(frozen=True)
class ResultRow:
    """One protocol run as the report sees it; a failed run has ``error`` and a NaN accuracy."""

    dataset: str
    method: str
    budget: int
    seed: int
    status: str
    test_accuracy: float
    run_id: str
    error: str = ""
    setting: str = PAPER_SETTING_LABEL

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def as_dict(self) -> dict:
        return asdict(self)


ROW_FIELDS = tuple(f.name for f in fields(ResultRow))
