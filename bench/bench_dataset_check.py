"""Dataset upload: time and peak memory of the check (portal.dataset_checks.check_dataset) and of
the whole upload (DatasetService.add: check, store, record) on a ~10 MB and a ~100 MB alpaca file,
each in a fresh process.

usage: .venv/bin/python bench/bench_dataset_check.py [--sizes 10,100] [--formats jsonl,json] [--repeats 1] [--keep]

The files are generated in a temp folder (alpaca rows of ~300 bytes; 2% repeat an earlier row and
1% are far longer than the cutoff, so that the duplicate search and the over-cutoff count have
work to do). Each check runs in its own `python -c` child: it imports the module (and numpy,
which the duplicate search uses), records its peak RSS (`ru_maxrss`) as the baseline, runs
check_dataset(path, DatasetSpec(), cutoff_len=512) and records the peak RSS again; the figure is
the difference, i.e. what the check itself added on top of the imports. `jsonl` is the budgeted
case; `json` (one pretty-printed JSON array, decoded element by element) is measured the same way.

The goal is that memory does not follow the file size: the check keeps one 8-byte digest per row
for the duplicate search (8 MB per million rows, and a sorted copy of it for a moment at the end),
nothing else per row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (bench/ is not a package)

NAME = "dataset_check"
CUTOFF_LEN = 512
# What may grow with the file is the duplicate search's digests: 8 bytes a row kept, and a sorted copy
# of them (8 bytes a row) for a moment at the end, i.e. 16 MB per million rows; the budget leaves room
# for the allocator. The 100 MB / 10 MB ratio of the added memory is printed for the record: with a
# fixed part of about 1 MB it is dominated by those 16 bytes a row, so it has no budget of its own.
BUDGET_MB_PER_MILLION_ROWS = 32.0

CHILD = r"""
import json, resource, sys, tempfile, time
sys.path.insert(0, sys.argv[2])
import numpy  # noqa: F401  (imported by the duplicate search: part of the baseline, like the module)
from portal.dataset_checks import DatasetSpec, check_dataset
from portal.catalog import Catalog
from portal.config import Settings
from portal.datasets import DatasetService
from portal.db import Database
from portal.models import User
settings = Settings(data_root=tempfile.mkdtemp(prefix="lbp-bench-upload-"), gpus=[], max_upload_mb=1024)
settings.ensure_dirs()
db = Database(settings.db_url)
db.migrate()
service = DatasetService(settings, db, Catalog(settings))
with db.session() as s:
    user = User(username="bench")
    s.add(user)
    s.commit()
    s.refresh(user)
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
report = check_dataset(sys.argv[1], DatasetSpec(), cutoff_len=int(sys.argv[3]))
wall = time.perf_counter() - t0
check_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
version, _ = service.add(user, sys.argv[1], "bench_set", DatasetSpec(), cutoff_len=int(sys.argv[3]))
upload_wall = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": wall, "baseline_rss_mb": base_kb / 1024, "peak_rss_mb": check_peak_kb / 1024,
                  "added_rss_mb": (check_peak_kb - base_kb) / 1024, "rows": report.rows, "ok": report.ok,
                  "upload_wall_s": upload_wall, "upload_added_rss_mb": (peak_kb - base_kb) / 1024,
                  "stored_rows": version.rows,
                  "problems": {p.kind: p.count for p in report.problems}}))
import shutil
shutil.rmtree(settings.data_root, ignore_errors=True)
"""

WORDS = ("the bank loan account credit risk model customer payment interest rate mortgage deposit branch "
         "transfer balance statement fee card limit approval fraud alert compliance report quarter").split()


def generate(path: Path, target_bytes: int, fmt: str, seed: int = 7) -> int:
    """~target_bytes of alpaca rows (fmt jsonl: one object a line; json: a pretty-printed array).
    Every 50th row repeats an earlier one, every 100th is ~12k characters (over the cutoff)."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(WORDS, k=k)) for k in (8, 12, 20, 30, 45) for _ in range(40)]
    long_text = " ".join(rng.choices(WORDS, k=2000))
    written, n, kept = 0, 0, []
    with path.open("w", encoding="utf-8") as f:
        if fmt == "json":
            f.write("[\n")
        while written < target_bytes:
            if n % 50 == 49 and kept:
                row = kept[rng.randrange(len(kept))]
            else:
                row = {"instruction": f"{rng.choice(pool)} #{n}", "input": rng.choice(("", rng.choice(pool))),
                       "output": long_text if n % 100 == 0 else f"{rng.choice(pool)}. {rng.choice(pool)}."}
                if len(kept) < 1000:
                    kept.append(row)
            if fmt == "json":
                text = ("" if n == 0 else ",\n") + json.dumps(row, indent=2, ensure_ascii=False)
            else:
                text = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(text)
            written += len(text)
            n += 1
        if fmt == "json":
            f.write("\n]\n")
    return n


def run_child(path: Path) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(C.ROOT), str(CUTOFF_LEN)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"check of {path.name} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.monotonic() - t0
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,100", help="file sizes in MB, comma-separated (10,100)")
    p.add_argument("--formats", default="jsonl,json", help="jsonl and/or json (a JSON array)")
    p.add_argument("--repeats", type=int, default=1, help="checks per file (the fastest is kept)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    opts = p.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    formats = [f for f in opts.formats.split(",") if f]

    tmp = Path(tempfile.mkdtemp(prefix="lbp-bench-dataset-"))
    results: list[dict] = []
    try:
        for fmt in formats:
            for size in sizes:
                path = tmp / f"alpaca_{size}mb.{fmt}"
                t0 = time.monotonic()
                rows = generate(path, size * 10**6, fmt)
                mb = path.stat().st_size / 10**6
                C.log(f"generated {path.name}: {mb:.1f} MB, {rows:,} rows ({time.monotonic() - t0:.1f} s)")
                runs = [run_child(path) for _ in range(max(1, opts.repeats))]
                best = min(runs, key=lambda r: r["wall_s"])
                assert best["rows"] == rows, (best["rows"], rows)
                best.update(format=fmt, size_mb=mb, generated_rows=rows, mb_per_s=mb / best["wall_s"],
                            all_wall_s=[r["wall_s"] for r in runs], all_added_rss_mb=[r["added_rss_mb"] for r in runs])
                C.log(f"checked {path.name}: {best['wall_s']:.2f} s, +{best['added_rss_mb']:.1f} MB peak RSS, "
                      f"problems {best['problems']}; upload (check + store + record) {best['upload_wall_s']:.2f} s, "
                      f"+{best['upload_added_rss_mb']:.1f} MB peak RSS")
                results.append(best)
    finally:
        if opts.keep:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"== {NAME}: check_dataset on generated alpaca files, each in a fresh process "
          f"(cutoff_len {CUTOFF_LEN}, best of {opts.repeats}) ==")
    head = ("file", "size MB", "rows", "check s", "MB/s", "added peak RSS MB", "upload s", "upload added RSS MB",
            "problems found")
    table = [(f"{r['format']} {round(r['size_mb'])} MB", f"{r['size_mb']:.1f}", f"{r['rows']:,}", f"{r['wall_s']:.2f}",
              f"{r['mb_per_s']:.1f}", f"{r['added_rss_mb']:.1f}", f"{r['upload_wall_s']:.2f}",
              f"{r['upload_added_rss_mb']:.1f}",
              ", ".join(f"{k} {v:,}" for k, v in r["problems"].items())) for r in results]
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    for row in [head, *table]:
        print("  " + "  ".join(c.ljust(widths[i]) if i in (0, 8) else c.rjust(widths[i]) for i, c in enumerate(row)))
    print("  (upload = DatasetService.add: the check again, the copy into the user's space while hashing, the "
          "version row and the dataset_info.json entry)")

    summary: dict[str, dict] = {}
    ok_all = True
    for fmt in formats:
        mine = sorted((r for r in results if r["format"] == fmt), key=lambda r: r["size_mb"])
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        ratio = large["added_rss_mb"] / max(small["added_rss_mb"], 0.5)  # ru_maxrss noise floor
        per_million = ((large["added_rss_mb"] - small["added_rss_mb"]) / max(large["rows"] - small["rows"], 1)) * 1e6
        fixed = small["added_rss_mb"] - per_million * small["rows"] / 1e6
        summary[fmt] = {"memory_ratio": ratio, "mb_per_million_rows": per_million, "fixed_mb": fixed,
                        "mb_per_s_small": small["mb_per_s"], "mb_per_s_large": large["mb_per_s"]}
        size_ratio = large["size_mb"] / small["size_mb"]
        print(f"  {fmt}: file {size_ratio:.0f}x larger -> added peak memory x{ratio:.2f} "
              f"({small['added_rss_mb']:.1f} -> {large['added_rss_mb']:.1f} MB for {large['size_mb']:.0f} MB read): "
              f"about {fixed:.1f} MB fixed + {per_million:.1f} MB per million rows; throughput "
              f"{small['mb_per_s']:.0f} / {large['mb_per_s']:.0f} MB/s")
        ok = per_million <= BUDGET_MB_PER_MILLION_ROWS
        ok_all = ok_all and ok
        print(C.budget_line(f"memory per million rows ({fmt})", f"{per_million:.1f} MB",
                            f"<= {BUDGET_MB_PER_MILLION_ROWS:.0f} MB", ok))
    print("  (what grows with the rows is the duplicate search: one 8-byte digest a row while reading, 8 MB per "
          "million rows, and a sorted copy of it for a moment at the end; the rest is fixed-size read buffers)")

    result = {"params": {"sizes_mb": sizes, "formats": formats, "repeats": opts.repeats, "cutoff_len": CUTOFF_LEN},
              "budget_mb_per_million_rows": BUDGET_MB_PER_MILLION_ROWS,
              "ok": ok_all, "files": results, "summary": summary}
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
