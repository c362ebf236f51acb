"""The brain-subjects grid's cell records, kept in the repository so that the grid resumes on a fresh machine.

A grid folder (`ahm bench curve --out GRID`) lives outside the repository and is lost with the machine it ran
on; a finished cell is only its `cells/NAME/cell.json` (a row of results.csv), which is all `--gather` and
the paired tables read. So:

    python restore.py save GRID    # GRID/cells/*/cell.json and GRID/pretrain/*/summary.json -> here
    python restore.py load GRID    # here -> GRID, before resuming: `bench curve` keeps every cell it finds
    python restore.py from-csv RESULTS.csv GRID [--skip NAME ...]
                                   # rebuild cell.json files from a gathered results.csv (the only record left of
                                   # cells whose folders were lost); each carries `restored_from`

`ahm bench curve` names cells `{backbone}-{policy}-corpus{corpus}-labels{labels}-seed{seed}`; rows restored from a
CSV lack only the `level` field (per-image Dice, the default), which no table reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTS = ("corpus_subjects", "labelled_subjects", "seed")
FLOATS = ("dice", "dataset_dice", "iou", "hd95", "val_dice", "pretrain_final_loss", "hardness_ratio",
          "critic_spearman", "pretrain_s", "finetune_s")


def cell_name(row: dict) -> str:
    return f"{row['backbone']}-{row['policy']}-corpus{row['corpus']}-labels{row['labels']}-seed{row['seed']}"


def typed(row: dict[str, str]) -> dict:
    """A results.csv row as `bench curve` wrote it in cell.json: numbers as numbers, empty fields as null."""
    out: dict = {}
    for key, value in row.items():
        if value == "":
            out[key] = None
        elif key in INTS:
            out[key] = int(value)
        elif key in FLOATS:
            out[key] = float(value)
        elif key == "labels":
            out[key] = value if value == "all" else int(value)
        else:
            out[key] = value
    return out


def copy_records(src: Path, dst: Path) -> int:
    n = 0
    for sub, name in (("cells", "cell.json"), ("pretrain", "summary.json")):
        for record in sorted((src / sub).glob(f"*/{name}")):
            target = dst / sub / record.parent.name / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record, target)
            n += 1
    return n


def from_csv(table: Path, grid: Path, skip: set[str]) -> int:
    n = 0
    with table.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = typed(raw)
            name = cell_name(row)
            target = grid / "cells" / name / "cell.json"
            if name in skip or target.exists():
                continue
            row["restored_from"] = f"experiments/{table.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(row, indent=2) + "\n")
            n += 1
    return n


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load"):
        sub.add_parser(name).add_argument("grid", type=Path)
    rebuild = sub.add_parser("from-csv")
    rebuild.add_argument("table", type=Path)
    rebuild.add_argument("grid", type=Path)
    rebuild.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.command == "save":
        print(f"saved {copy_records(args.grid, HERE)} records from {args.grid}")
    elif args.command == "load":
        print(f"loaded {copy_records(HERE, args.grid)} records into {args.grid}")
    else:
        print(f"restored {from_csv(args.table, args.grid, set(args.skip))} cells from {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
