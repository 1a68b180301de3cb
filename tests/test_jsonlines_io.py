"""JSONL goes through the `jsonlines` package: records are read by a jsonlines.Reader running
neumuter's strict parser and written by a jsonlines.Writer, with the same bytes and the same
error lines (file:line: why) as the rest of the suite checks."""
import io
import json

import jsonlines
import pytest

from neumuter_cli import NeumuterError
from neumuter_cli.mia import read_reference_scores
from neumuter_cli.records import dumps_record, iter_records, record_writer, strict_loads

RECORDS = [{"id": 1, "text": "plain"}, {"text": "ünïcode \u2028 line separator", "meta": {"k": [1, 2.5, None]}},
           {"text": "a \U0001F600", "big": 10 ** 30}]


def test_the_reader_is_a_jsonlines_reader(monkeypatch, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(dumps_record(r) + "\n" for r in RECORDS), encoding="utf-8")
    made = []
    real = jsonlines.Reader

    def spy(*args, **kwargs):
        made.append(kwargs.get("loads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jsonlines, "Reader", spy)
    assert list(iter_records(str(source))) == RECORDS
    assert len(made) == 1 and made[0] is not None        # neumuter's parser inside the reader


def test_written_records_are_the_dumps_lines_byte_for_byte():
    out = io.StringIO()
    with record_writer(out) as writer:
        writer.write_all(RECORDS)
    assert out.getvalue() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)
    assert [json.loads(line) for line in out.getvalue().split("\n")[:-1]] == RECORDS


def test_a_record_that_parses_but_is_invalid_is_reported_on_its_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a"}\n\n\r\n{"text": "b"}\r{"id": 4}\n', encoding="utf-8")
    with pytest.raises(NeumuterError) as info:
        list(iter_records(str(source)))
    assert str(info.value) == f'{source}:5: record has no "text"'


@pytest.mark.parametrize("line, why", [
    ('{"text": NaN}', "invalid JSON (NaN is not a JSON value)"),
    ('{"text": "\\udc00"}', "invalid JSON (a lone surrogate \\udc00 is not Unicode text)"),
    ('{"text": "caf\udce9"}', "not UTF-8 text (byte 0xe9 at column 14)"),
    ('{"text": ', "invalid JSON (Expecting value at column 10)"),
])
def test_strict_loads_says_why(line, why):
    with pytest.raises(ValueError) as info:
        strict_loads(line + "\n")
    assert str(info.value) == why


def test_reference_scores_jsonl_keeps_line_separators_inside_texts(tmp_path):
    texts = ["first \u2028 text", "second\u0085text"]
    scores = tmp_path / "ref.jsonl"
    with open(scores, "w", encoding="utf-8") as out, record_writer(out) as writer:
        writer.write_all({"text": t, "tokens": 5, "ma": 0.5, "el_10": None, "loss": 2.0, "model_fingerprint": "0" * 32}
                         for t in texts)
    read = read_reference_scores(str(scores), texts, (10,))
    assert [r["ma"] for r in read["records"]] == [0.5, 0.5]

    scores.write_text(scores.read_text(encoding="utf-8") + '{"text": oops}\n', encoding="utf-8")
    with pytest.raises(NeumuterError) as info:
        read_reference_scores(str(scores), texts, (10,))
    assert str(info.value) == f"{scores}:3: invalid JSON (Expecting value)"
