"""Reading and rewriting an 11k ``HandInfo.csv`` in tests (to break a dataset on purpose).

The column list is written out here, from the 11k release, independently of the package.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
           "imageName", "irregularities"]


def read_rows(src: Path) -> list[dict]:
    with (src / "HandInfo.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(src: Path, rows: list[dict], columns=COLUMNS) -> None:
    with (src / "HandInfo.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def dorsal_right_files(src: Path) -> dict[str, list[str]]:
    """identity -> image names of the usable (accessories 0) dorsal-right rows, in CSV order."""
    files: dict[str, list[str]] = {}
    for row in read_rows(src):
        if row["aspectOfHand"] == "dorsal right" and row["accessories"] == "0":
            files.setdefault(row["id"], []).append(row["imageName"])
    return files
