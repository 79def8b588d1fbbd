"""portal.dataset_checks on real files written to tmp_path: every check with a broken file, the
four file types, both sharegpt tag styles, the spec helpers, and what `datasets` (LLaMA-Factory's
reader) makes of the same files."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import tracemalloc
from pathlib import Path

import pytest

from portal import dataset_checks as dc
from portal.dataset_checks import (
    CheckReport,
    DatasetSpec,
    check_dataset,
    guess_spec,
    guess_spec_for_file,
    sniff_columns,
)

ALPACA = [
    {"instruction": "What is a loan-to-value ratio?", "input": "", "output": "The loan amount divided by the value."},
    {"instruction": "Translate to French", "input": "credit risk", "output": "risque de crédit"},
    {"instruction": "Summarise", "input": "Rates rose by 25 bp.", "output": "Rates went up a quarter point."},
]
SHAREGPT = [  # ShareGPT style: from/value, human/gpt, an optional first system message
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, how can I help?"}]},
    {"conversations": [{"from": "system", "value": "You are a bank assistant."}, {"from": "human", "value": "IBAN?"},
                       {"from": "gpt", "value": "An account number."}, {"from": "human", "value": "Thanks"},
                       {"from": "gpt", "value": "You are welcome."}]},
]
OPENAI = [  # OpenAI style: role/content, user/assistant
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
]
OPENAI_SPEC = DatasetSpec("sharegpt", {"messages": "messages"}, dict(dc.OPENAI_TAGS))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list, indent: int | None = 2) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=indent), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}
ALPACA_SPEC = DatasetSpec()  # instruction / input / output


def kinds(report: CheckReport) -> list[str]:
    return [p.kind for p in report.problems]


# ---- valid files -------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_valid_alpaca_in_every_file_type(tmp_path, ext):
    path = WRITERS[ext](tmp_path / f"data.{ext}", ALPACA)
    report = check_dataset(path, ALPACA_SPEC, preview_rows=2)
    assert report.ok and report.problems == [], [p.message for p in report.problems]
    assert report.file_type == ext
    assert report.rows == 3 and report.usable_rows == 3
    assert report.size_bytes == path.stat().st_size
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.columns_seen == ["instruction", "input", "output"]
    assert sniff_columns(path) == ["instruction", "input", "output"]
    # alpaca normalised: prompt + "\n" + query as the user turn (an empty query left out), response as assistant
    assert report.preview == [
        {"system": None, "messages": [{"role": "user", "content": "What is a loan-to-value ratio?"},
                                      {"role": "assistant", "content": "The loan amount divided by the value."}]},
        {"system": None, "messages": [{"role": "user", "content": "Translate to French\ncredit risk"},
                                      {"role": "assistant", "content": "risque de crédit"}]},
    ]


def test_alpaca_system_and_history_columns(tmp_path):
    rows = [{"q": "And in euros?", "a": "About 92 EUR.", "sys": "Be exact.",
             "hist": [["100 USD in GBP?", "About 79 GBP."]]}]
    spec = DatasetSpec(columns={"prompt": "q", "query": None, "response": "a", "system": "sys", "history": "hist"})
    report = check_dataset(write_jsonl(tmp_path / "h.jsonl", rows), spec)
    assert report.ok and report.problems == []
    assert report.preview == [{"system": "Be exact.", "messages": [
        {"role": "user", "content": "100 USD in GBP?"}, {"role": "assistant", "content": "About 79 GBP."},
        {"role": "user", "content": "And in euros?"}, {"role": "assistant", "content": "About 92 EUR."}]}]
    bad = check_dataset(write_jsonl(tmp_path / "hb.jsonl", rows + [{**rows[0], "hist": ["not a pair"]}]), spec)
    problem = bad.problem("mixed_formats")
    assert problem and problem.rows == [2] and "'hist' (history)" in problem.message


def test_sharegpt_from_value_tags(tmp_path):
    path = write_json(tmp_path / "sg.json", SHAREGPT)
    report = check_dataset(path, DatasetSpec("sharegpt"))
    assert report.ok and report.problems == [] and report.rows == 2 and report.row_unit == "record"
    assert report.preview[1]["system"] == "You are a bank assistant."
    assert [m["role"] for m in report.preview[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert report.preview[0]["messages"][1] == {"role": "assistant", "content": "Hello, how can I help?"}


def test_sharegpt_openai_role_content_tags(tmp_path):
    path = write_jsonl(tmp_path / "oa.jsonl", OPENAI)
    report = check_dataset(path, OPENAI_SPEC)
    assert report.ok and report.problems == [] and report.rows == 2
    assert report.preview[0] == {"system": "Be brief.", "messages": [{"role": "user", "content": "2+2?"},
                                                                    {"role": "assistant", "content": "4"}]}
    # the same file with the default (from/value) tags: every row has the wrong shape, and the fix is named
    wrong = check_dataset(path, DatasetSpec("sharegpt", {"messages": "messages"}))
    problem = wrong.problem("mixed_formats")
    assert not wrong.ok and problem.count == 2 and problem.rows == [1, 2]
    assert "role tag to 'role'" in problem.message and "'from' and 'value'" in problem.message


def test_sharegpt_in_parquet_and_csv_header_with_bom(tmp_path):
    report = check_dataset(write_parquet(tmp_path / "sg.parquet", SHAREGPT), DatasetSpec("sharegpt"))
    assert report.ok and report.rows == 2 and report.row_unit == "row"
    path = tmp_path / "bom.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    path.write_bytes(b"\xef\xbb\xbfinstruction,output\nq1,a1\nq2,a2\n")
    report = check_dataset(path, DatasetSpec(columns={"query": None}))
    assert report.ok and report.columns_seen == ["instruction", "output"] and report.rows == 2


# ---- parse errors ------------------------------------------------------------------------------

def test_jsonl_parse_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in ALPACA] + ['{"instruction": "x" "output": "y"}', json.dumps(ALPACA[0])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = check_dataset(path, ALPACA_SPEC)
    assert kinds(report) == ["parse"] and not report.ok
    problem = report.problems[0]
    assert problem.rows == [4] and problem.count == 1 and problem.blocking
    assert problem.message.startswith("line 4, column 21: Expecting ',' delimiter")
    assert "each line must be one complete JSON object" in problem.message
    assert report.rows == 3  # stopped at the first parse error
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # still the whole file


def test_jsonl_pretty_printed_object_gets_a_hint(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text('{\n  "instruction": "a",\n  "output": "b"\n}\n', encoding="utf-8")
    problem = check_dataset(path, ALPACA_SPEC).problem("parse")
    assert problem.message.startswith("line 1, column 2:") and "JSON array" in problem.message


def test_json_array_parse_error_offset_becomes_line_and_column(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "CHUNK_CHARS", 64)  # the error lies beyond several buffer refills
    text = json.dumps(ALPACA * 3, indent=2)  # 9 records over many lines
    seps, at = [], -1
    while (at := text.find("},\n  {", at + 1)) >= 0:
        seps.append(at)
    broken = text[:seps[5] + 1] + text[seps[5] + 2:]  # the comma between records 6 and 7 removed
    path = tmp_path / "bad.json"
    path.write_text(broken, encoding="utf-8")
    report = check_dataset(path, ALPACA_SPEC)
    problem = report.problem("parse")
    offset = broken.index("{", seps[5] + 1)  # where the ',' was expected: record 7's opening brace
    line = broken.count("\n", 0, offset) + 1
    column = offset - broken.rfind("\n", 0, offset)
    assert (line, column) == (32, 3)  # '[' then 6 records of 5 lines
    assert problem.message.startswith(f"line {line}, column {column} (record 7): Expecting ',' delimiter")
    assert problem.rows == [7] and report.rows == 6 and report.row_unit == "record"


@pytest.mark.parametrize("text, start", [
    ('[{"instruction": "a", "output": "b"},]', "line 1, column 38 (record 2): Expecting value"),
    ('[{"instruction": "a", "output": "b"}', "line 1, column 37 (record 2): Expecting ',' or ']'"),
    ('[{"instruction": "a", "output": "b"}]\n]', "line 2, column 1: Extra data"),
])
def test_json_array_structure_errors(tmp_path, text, start):
    path = tmp_path / "s.json"
    path.write_text(text, encoding="utf-8")
    problem = check_dataset(path, DatasetSpec(columns={"query": None})).problem("parse")
    assert problem is not None and problem.message.startswith(start), problem


def test_csv_too_many_values_and_unclosed_quote(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text('instruction,output\nq1,a1\n"multi\nline",a2\nq3,3,5 percent\n', encoding="utf-8")
    report = check_dataset(path, DatasetSpec(columns={"query": None}))
    problem = report.problem("parse")
    assert problem.rows == [5] and problem.message.startswith("line 5: 3 values but the header has 2 columns")
    assert "double quotes" in problem.message and report.rows == 2
    path = tmp_path / "unclosed.csv"
    path.write_text('instruction,output\nq1,a1\nq2,"a2\nq3,a3\n', encoding="utf-8")
    problem = check_dataset(path, DatasetSpec(columns={"query": None})).problem("parse")
    assert problem.rows == [3] and "line 3: a double-quoted value starts on this line and is never closed" \
        in problem.message


def test_not_utf8_is_unreadable_with_line_and_column(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("instruction,output\nq1,a1\nq2,caf\xe9\n".encode("latin-1"))
    report = check_dataset(path, DatasetSpec(columns={"query": None}))
    assert kinds(report) == ["unreadable"] and not report.ok
    problem = report.problems[0]
    assert problem.rows == [3] and "line 3, column 7 has the byte 0xE9" in problem.message
    assert "Save the file as UTF-8" in problem.message
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_json_array_with_bom_is_refused_jsonl_with_bom_is_fine(tmp_path):
    body = json.dumps(ALPACA).encode()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + body)
    problem = check_dataset(tmp_path / "bom.json", ALPACA_SPEC).problem("unreadable")
    assert problem and problem.blocking and "byte-order mark" in problem.message
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", ALPACA).read_bytes())
    assert check_dataset(tmp_path / "bom.jsonl", ALPACA_SPEC).ok


def test_other_extensions_are_refused(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    report = check_dataset(path, ALPACA_SPEC)
    assert kinds(report) == ["unreadable"] and not report.ok
    assert ".json, .jsonl, .csv or .parquet" in report.problems[0].message and "(.xlsx)" in report.problems[0].message
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert kinds(check_dataset(path, ALPACA_SPEC)) == ["unreadable"]


def test_either_json_layout_under_either_extension(tmp_path):
    """datasets reads JSON Lines in a .json file and an array in a .jsonl file: so do the checks."""
    lines = write_jsonl(tmp_path / "lines.json", ALPACA)
    array = write_json(tmp_path / "array.jsonl", ALPACA)
    assert check_dataset(lines, ALPACA_SPEC).rows == 3 and check_dataset(lines, ALPACA_SPEC).row_unit == "line"
    assert check_dataset(array, ALPACA_SPEC).rows == 3 and check_dataset(array, ALPACA_SPEC).row_unit == "record"


# ---- row checks ------------------------------------------------------------------------------

def test_missing_columns_in_the_whole_file_name_the_columns_found(tmp_path):
    rows = [{"question": "a", "answer": "b"}] * 3
    report = check_dataset(write_jsonl(tmp_path / "qa.jsonl", rows), ALPACA_SPEC)
    assert kinds(report) == ["missing_columns"] and not report.ok
    problem = report.problems[0]
    assert problem.count == 3 and problem.rows == [1, 2, 3]
    assert "'instruction' (prompt), 'input' (query), 'output' (response)" in problem.message
    assert "Columns found: 'question', 'answer'" in problem.message
    # an optional column named in the spec but not in the file breaks LLaMA-Factory (KeyError) too
    report = check_dataset(write_jsonl(tmp_path / "noinput.jsonl", [{"instruction": "a", "output": "b"}]),
                           ALPACA_SPEC)
    problem = report.problem("missing_columns")
    assert problem and "'input' (query) is not in the file" in problem.message and "optional" in problem.message


def test_semicolon_csv_gets_a_hint(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("instruction;output\nq1;a1\n", encoding="utf-8")
    problem = check_dataset(path, DatasetSpec(columns={"query": None})).problem("missing_columns")
    assert "separated by ';'" in problem.message and "Columns found: 'instruction;output'" in problem.message


def test_rows_missing_a_required_field(tmp_path):
    rows = [*ALPACA, {"instruction": "no answer", "input": ""}, ALPACA[0], {"input": "x", "output": "y"}]
    report = check_dataset(write_jsonl(tmp_path / "m.jsonl", rows), ALPACA_SPEC)
    problem = report.problem("missing_columns")
    assert problem.count == 2 and problem.rows == [4, 6] and problem.blocking
    assert "'instruction' (prompt) or 'output' (response)" in problem.message and "lines 4, 6" in problem.message


def test_mixed_formats(tmp_path):
    rows = [ALPACA[0], ["a", "list"], {"instruction": "x", "input": "", "output": 5}, SHAREGPT[0], ALPACA[1]]
    report = check_dataset(write_jsonl(tmp_path / "mixed.jsonl", rows), ALPACA_SPEC)
    problem = report.problem("mixed_formats")
    assert problem.count == 3 and problem.rows == [2, 3, 4] and problem.blocking and not report.ok
    for part in ("is a list, not an object", "'output' (response) is a number, not text",
                 "looks like a conversation (sharegpt) row ('conversations')", "lines 2, 3, 4"):
        assert part in problem.message
    sg_rows = [SHAREGPT[0], ALPACA[0], {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]},
               {"conversations": "hello"}, {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
               {"conversations": [["human", "hi"]]}, SHAREGPT[1]]
    report = check_dataset(write_jsonl(tmp_path / "mixed_sg.jsonl", sg_rows), DatasetSpec("sharegpt"))
    problem = report.problem("mixed_formats")
    assert problem.count == 5 and problem.rows == [2, 3, 4, 5, 6] and report.usable_rows == 2
    for part in ("looks like an instruction/output (alpaca) row", "a message's 'from' or 'value' is not text",
                 "'conversations' is text, not a list of messages"):
        assert part in problem.message


def test_empty_rows_are_a_warning(tmp_path):
    rows = [ALPACA[0], {"instruction": "  ", "input": "", "output": ""}, {"instruction": "x", "input": "", "output": " "},
            {"instruction": "", "input": "text", "output": "y"}]  # the last: the input alone is the prompt: fine
    report = check_dataset(write_jsonl(tmp_path / "e.jsonl", rows), ALPACA_SPEC)
    assert kinds(report) == ["empty_rows"] and report.ok
    problem = report.problems[0]
    assert problem.count == 2 and problem.rows == [2, 3] and not problem.blocking and "lines 2, 3" in problem.message
    sg = [SHAREGPT[0], {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": " "}]}]
    problem = check_dataset(write_json(tmp_path / "e.json", sg), DatasetSpec("sharegpt")).problem("empty_rows")
    assert problem.count == 1 and problem.rows == [2] and "record 2" in problem.message


def test_over_cutoff_estimate_and_tokenizer(tmp_path):
    rows = [ALPACA[0], {"instruction": "x" * 200, "input": "", "output": "y" * 199}, ALPACA[1],
            {"instruction": "z" * 40, "input": "", "output": "w" * 39}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = check_dataset(path, ALPACA_SPEC, cutoff_len=50)
    problem = report.problem("over_cutoff")
    assert report.ok and problem.count == 1 and problem.rows == [2] and not problem.blocking
    assert "cutoff length of 50 tokens" in problem.message and "estimated" in problem.message
    assert "choose a model" in problem.message and "line 2, has 100" in problem.message  # ceil((200+1+199)/4)
    assert check_dataset(path, ALPACA_SPEC).problem("over_cutoff") is None  # only with a cutoff_len
    words = check_dataset(path, ALPACA_SPEC, cutoff_len=5, count_tokens=lambda text: len(text.split()))
    problem = words.problem("over_cutoff")  # ALPACA[0] has 12 words, ALPACA[1] 6, the others 2
    assert problem.count == 2 and problem.rows == [1, 3] and "tokenizer" in problem.message


def test_duplicates_keep_digests_and_give_the_later_rows(tmp_path):
    rows = [ALPACA[0], ALPACA[1], dict(ALPACA[0], output=ALPACA[0]["output"] + "  "), ALPACA[2], ALPACA[1], ALPACA[1]]
    path = tmp_path / "d.jsonl"  # blank lines: the numbers given are the file's lines
    path.write_text("\n".join(json.dumps(r) if i != 2 else "\n" + json.dumps(r) for i, r in enumerate(rows)) + "\n",
                    encoding="utf-8")
    report = check_dataset(path, ALPACA_SPEC)
    problem = report.problem("duplicates")
    assert problem.count == 3 and problem.rows == [4, 6, 7] and not problem.blocking and report.ok
    assert "line 4 repeats line 1" in problem.message


def test_duplicates_in_csv_with_multiline_records(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"a\nb\nc",x\nq,y\n\n"a\nb\nc",x\nq,y\n', encoding="utf-8")
    problem = check_dataset(path, DatasetSpec(columns={"query": None})).problem("duplicates")
    assert problem.rows == [7, 10] and "line 7 repeats line 2" in problem.message


def test_turn_order(tmp_path):
    rows = [
        SHAREGPT[0],
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"},
                           {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]},
        SHAREGPT[1],
    ]
    report = check_dataset(write_json(tmp_path / "t.json", rows), DatasetSpec("sharegpt"))
    problem = report.problem("turn_order")
    assert report.ok and problem.count == 3 and problem.rows == [2, 3, 4] and not problem.blocking
    assert "records 2, 3, 4" in problem.message and "skips these rows" in problem.message
    assert "message 1 has the role 'gpt' where human/observation was expected" in problem.message
    assert report.usable_rows == 2 and report.split_counts(0) == (2, 0)
    # tags that match no row: every row would be dropped, so it blocks, and the fix is named
    oa = check_dataset(write_jsonl(tmp_path / "oa.jsonl", OPENAI),
                       DatasetSpec("sharegpt", {"messages": "messages"}, {"role_tag": "role", "content_tag": "content"}))
    problem = oa.problem("turn_order")
    assert problem.count == 2 and problem.blocking and not oa.ok
    assert "'user'" in problem.message and "user tag 'user'" in problem.message


def test_no_rows_and_too_many_rows(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[ ]"),
                       ("header.csv", "instruction,output\n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        report = check_dataset(tmp_path / name, ALPACA_SPEC)
        assert kinds(report) == ["no_rows"] and not report.ok and report.rows == 0, name
    assert "only a header line" in report.problems[0].message
    path = write_jsonl(tmp_path / "many.jsonl", ALPACA * 4)
    report = check_dataset(path, ALPACA_SPEC, max_rows=10)
    problem = report.problem("too_many_rows")
    assert problem.blocking and report.rows == 10 and problem.rows == [11]
    assert "more than 10 rows" in problem.message and dc.MAX_ROWS_SETTING in problem.message
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert check_dataset(path, ALPACA_SPEC, max_rows=12).problem("too_many_rows") is None
    report = check_dataset(write_parquet(tmp_path / "many.parquet", ALPACA * 4), ALPACA_SPEC, max_rows=10)
    assert report.problem("too_many_rows").rows == [11] and report.rows == 10


def test_lone_surrogate_and_odd_values_do_not_crash(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "a\\ud800", "input": null, "output": "b"}\n' * 2, encoding="utf-8")
    report = check_dataset(path, ALPACA_SPEC)
    assert report.rows == 2 and report.problem("duplicates").rows == [2]


# ---- streaming -----------------------------------------------------------------------------------

def test_json_array_of_20k_rows_is_streamed(tmp_path, monkeypatch):
    rows = [{"instruction": f"question {i} " + "x" * (i % 50), "input": "", "output": f"answer {i}"}
            for i in range(20_000)]
    rows[123] = rows[7]
    path = write_json(tmp_path / "big.json", rows, indent=1)
    monkeypatch.setattr(dc, "CHUNK_CHARS", 1 << 14)  # about 100 buffer refills
    report = check_dataset(path, ALPACA_SPEC)
    assert report.rows == 20_000 and report.usable_rows == 20_000
    assert [(p.kind, p.count, p.rows) for p in report.problems] == [("duplicates", 1, [124])]


def test_json_array_memory_does_not_follow_the_file_size(tmp_path, monkeypatch):
    rows = [{"instruction": f"question {i} " + "x" * 3000, "input": "", "output": f"answer {i}"} for i in range(1500)]
    path = write_json(tmp_path / "wide.json", rows)
    size = path.stat().st_size  # about 4.5 MB
    monkeypatch.setattr(dc, "CHUNK_CHARS", 1 << 16)
    tracemalloc.start()
    try:
        report = check_dataset(path, ALPACA_SPEC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.rows == 1500 and report.ok
    assert peak < size / 3, (peak, size)  # json.load would need more than the file's size


def test_json_array_chunk_boundaries_cut_anywhere(tmp_path, monkeypatch):
    """Numbers, literals, escapes and multi-byte characters cut at every buffer boundary."""
    path = tmp_path / "cut.json"
    path.write_text('[{"instruction": "caf\u00e9 \\u00e9\\" \u4e2d", "output": "x", "n": 12345678},\n'
                    ' 3.25, 12345, true, null, [1, 2],{"instruction":"b","output":"-1e5"} ]', encoding="utf-8")
    for chunk in range(1, 60):
        monkeypatch.setattr(dc, "CHUNK_CHARS", chunk)
        report = check_dataset(path, DatasetSpec(columns={"query": None}))
        assert report.rows == 7 and report.problem("parse") is None, (chunk, report.problems)
        assert report.problem("mixed_formats").rows == [2, 3, 4, 5, 6], chunk
        assert report.preview[0]["messages"][0]["content"] == 'caf\u00e9 \u00e9" \u4e2d', chunk


# ---- spec, guess, split, info entry ---------------------------------------------------------------

def test_spec_resolution_and_validation():
    assert DatasetSpec().resolved_columns() == {"prompt": "instruction", "query": "input", "response": "output"}
    spec = DatasetSpec(columns={"query": None, "system": "sys", "messages": "ignored for alpaca"})
    assert spec.resolved_columns() == {"prompt": "instruction", "response": "output", "system": "sys"}
    sg = DatasetSpec("sharegpt", tags={"role_tag": "role", "observation_tag": None})
    assert sg.resolved_columns() == {"messages": "conversations"}
    assert sg.resolved_tags() == {"role_tag": "role", "content_tag": "value", "user_tag": "human",
                                  "assistant_tag": "gpt", "function_tag": "function_call", "system_tag": "system"}
    for bad in ({"columns": {"promt": "x"}}, {"tags": {"role": "x"}}, {"columns": {"response": None}},
                {"formatting": "openai"}, {"columns": {"prompt": ""}}):
        with pytest.raises(ValueError):
            DatasetSpec(**bad)


def _llamafactory_parser_schema() -> tuple[set[str], set[str], dict[str, object]]:
    """The column and tag names DatasetAttr.join reads, and DatasetAttr's defaults, read from
    LLaMA-Factory's source (importing llamafactory takes 10 s)."""
    spec = importlib.util.find_spec("llamafactory")
    assert spec is not None and spec.submodule_search_locations, "llamafactory is a dependency of the portal"
    source = Path(next(iter(spec.submodule_search_locations)), "data", "parser.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    names: dict[str, set[str]] = {"column_names": set(), "tag_names": set()}
    defaults: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id in names and isinstance(node.value, ast.List):
                names[target.id] |= {elt.value for elt in node.value.elts}
        if isinstance(node, ast.ClassDef) and node.name == "DatasetAttr":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.value, ast.Constant):
                    defaults[item.target.id] = item.value.value
    return names["column_names"], names["tag_names"], defaults


def test_info_entry_matches_llamafactory_schema():
    columns, tags, defaults = _llamafactory_parser_schema()
    assert {"prompt", "query", "response", "history", "messages", "system", "tools"} <= columns
    for key, value in {**dc.ALPACA_COLUMNS, **dc.SHAREGPT_COLUMNS, **dc.SHAREGPT_TAGS}.items():
        assert defaults[key] == value, key  # the defaults here are LLaMA-Factory's
    entry = DatasetSpec(columns={"query": None, "system": "sys"}).info_entry("a.jsonl")
    assert entry == {"file_name": "a.jsonl", "formatting": "alpaca",
                     "columns": {"prompt": "instruction", "response": "output", "system": "sys"}}
    sg = OPENAI_SPEC.info_entry("b.json")
    assert set(sg) == {"file_name", "formatting", "columns", "tags"} and sg["formatting"] == "sharegpt"
    assert set(sg["columns"]) <= columns and set(sg["tags"]) <= tags
    # LLaMA-Factory sets every tag a present "tags" dict leaves out to None: all are written
    assert sg["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "observation_tag": "observation",
                          "function_tag": "function_call", "system_tag": "system"}
    json.dumps(sg)  # JSON-serialisable as it is


def test_guess_spec():
    assert guess_spec(["instruction", "input", "output"]) == DatasetSpec()
    assert guess_spec(["instruction", "output", "system"]) == DatasetSpec(columns={"query": None, "system": "system"})
    assert guess_spec(["question", "answer"]) == DatasetSpec(columns={"prompt": "question", "query": None,
                                                                      "response": "answer"})
    assert guess_spec(["conversations"]) == DatasetSpec("sharegpt")
    assert guess_spec(["messages"]) == OPENAI_SPEC
    assert guess_spec(["conversations"], {"conversations": [{"role": "user", "content": "x"}]}) == DatasetSpec(
        "sharegpt", {}, dict(dc.OPENAI_TAGS))
    assert guess_spec(["messages"], {"messages": [{"from": "human", "value": "x"}]}) == DatasetSpec(
        "sharegpt", {"messages": "messages"})
    assert guess_spec(["text"]) is None and guess_spec([]) is None


def test_guess_spec_for_file_then_check(tmp_path):
    for path in (write_jsonl(tmp_path / "oa.jsonl", OPENAI), write_json(tmp_path / "sg.json", SHAREGPT),
                 write_csv(tmp_path / "a.csv", [{"instruction": "q", "output": "a"}]),
                 write_parquet(tmp_path / "a.parquet", ALPACA)):
        spec = guess_spec_for_file(path)
        assert spec is not None and check_dataset(path, spec).ok, path


def test_split_counts_match_datasets_train_test_split():
    from datasets import Dataset

    report = CheckReport("jsonl", 0, "", rows=103, usable_rows=101)
    data = Dataset.from_dict({"x": list(range(101))})
    for val_size in (0.1, 0.05, 0.5, 0.99, 2, 7.9, 100):
        split = data.train_test_split(test_size=int(val_size) if val_size > 1 else val_size, seed=42)
        assert report.split_counts(val_size) == (len(split["train"]), len(split["test"])), val_size
    assert report.split_counts(0) == (101, 0)  # no evaluation set, as in LLaMA-Factory
    for bad, text in ((-0.1, "negative"), (1, "neither a fraction"), (101, "only 101 usable rows"),
                      (500.0, "only 101 usable rows"), (0.999, "leaves no training rows")):
        with pytest.raises(ValueError, match=text):
            report.split_counts(bad)
        if bad > 0:  # and datasets refuses it too
            with pytest.raises(ValueError):
                data.train_test_split(test_size=int(bad) if bad > 1 else float(bad), seed=42)
    with pytest.raises(ValueError, match="leaves no training rows"):
        CheckReport("jsonl", 0, "", rows=1, usable_rows=1).split_counts(0.5)


def test_datasets_reads_the_checked_files_with_the_same_rows(tmp_path):
    """The files and the dataset_info.json entries as the portal will write them, read the way
    LLaMA-Factory reads them (datasets' json builder), with the columns the entries name."""
    from datasets import load_dataset

    folder = tmp_path / "space"
    folder.mkdir()
    alpaca_rows = [*ALPACA, {"instruction": "Only an instruction", "input": "", "output": "ok"}]
    files = {"bank_alpaca": (write_jsonl(folder / "alpaca.jsonl", alpaca_rows), DatasetSpec()),
             "bank_chat": (write_json(folder / "chat.json", SHAREGPT + SHAREGPT[:1]), DatasetSpec("sharegpt"))}
    info = {}
    for name, (path, spec) in files.items():
        report = check_dataset(path, spec)
        assert report.ok, [p.message for p in report.problems]
        info[name] = spec.info_entry(path.name)
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        entry = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))[name]
        data = load_dataset("json", data_files=str(folder / entry["file_name"]), split="train",
                            cache_dir=str(tmp_path / "hf-cache"))
        assert len(data) == report.rows == report.usable_rows, name
        assert set(entry["columns"].values()) <= set(data.column_names), name  # no KeyError in the converter
    assert info["bank_chat"]["tags"]["role_tag"] == "from" and info["bank_alpaca"]["formatting"] == "alpaca"
