"""Generate the demo task: rewrite a date written in English as an ISO 8601 date (YYYY-MM-DD).

Writes iso_dates_train.jsonl and iso_dates_test.jsonl next to this file, one {"prompt", "completion"} record a line
(data.py's prompt/completion shape). The output is a pure function of the seed: running this script again rewrites
the committed files byte for byte, and test_demo.py checks that it does.

Why this task: the answer is short (10 characters), so exact match is a fair judge and greedy decoding is cheap; the
rules are fixed (month names to numbers, zero padding, field order) and learnable from a few hundred examples; and
SmolLM2-135M-Instruct, asked plainly, gets most of them wrong (it keeps the day-first order, invents years, or adds
chatter). Dates run from 1900 to 2099 in eight spellings; the test split holds dates that never occur in training.

Everything here was written by the minqlora project and is dedicated to the public domain (CC0 1.0, see LICENSE).
Leaves out: any other task, and the tokenization (minqlora.data).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Convert this date to ISO 8601 format (YYYY-MM-DD). Answer with the date only."
FIRST, LAST = dt.date(1900, 1, 1).toordinal(), dt.date(2099, 12, 31).toordinal()
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    """1 -> '1st', 12 -> '12th', 23 -> '23rd'."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spellings(d: dt.date) -> list[str]:
    """The ways a person might write `d` (all unambiguous: the month is always a word)."""
    month, day, year = MONTHS[d.month - 1], d.day, d.year
    return [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{month[:3]} {day} {year}",
        f"the {ordinal(day)} of {month}, {year}",
        f"{month} {ordinal(day)}, {year}",
        f"{day}-{month[:3]}-{year}",
        f"{WEEKDAYS[d.weekday()]}, {month} {day}, {year}",
        f"{year}, {month} {day}",
    ]


def record(d: dt.date, style: int) -> dict:
    return {"prompt": f"{INSTRUCTION}\nDate: {spellings(d)[style]}", "completion": d.isoformat()}


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct random dates, the first n_train for training and the rest held out; styles cycle evenly."""
    rng = random.Random(seed)
    days = rng.sample(range(FIRST, LAST + 1), n_train + n_test)
    n_styles = len(spellings(dt.date(2000, 1, 1)))
    records = [record(dt.date.fromordinal(o), i % n_styles) for i, o in enumerate(days)]
    return records[:n_train], records[n_train:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400, help="training examples (default 400)")
    parser.add_argument("--test", type=int, default=100, help="held-out examples (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: next to this script)")
    args = parser.parse_args(argv)
    train, test = make(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("iso_dates_train.jsonl", train), ("iso_dates_test.jsonl", test)):
        write_jsonl(args.out / name, records)
        print(f"wrote {len(records)} records to {args.out / name}")


if __name__ == "__main__":
    main()
