"""Loaders, validation errors, the split and its leakage check, on the real files and on small bad ones."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from conftest import GEN_CSV, ISARCASM_CSV, run_script

from sarcasm_dpo.data import check_no_leakage, load_gen, load_isarcasm, load_table, make_splits, normalise
from sarcasm_dpo.errors import UserError
from sarcasm_dpo.sampling import balanced_sample, stratified_sample


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_gen_loads_as_standard_table(shared_data):
    messages = []
    gen = load_gen(GEN_CSV, log=messages.append)
    assert list(gen.columns) == ["text", "label", "source", "id"]
    assert set(gen.label) == {0, 1} and (gen.source == "gen").all()
    # 6,520 rows; two texts repeat once case and spacing are folded, and the loader says so.
    assert len(gen) == 6518
    assert any("2 duplicated" in m for m in messages)


def test_isarcasmeval_quirks_are_reported_not_silent(shared_data):
    messages = []
    frame = load_isarcasm(ISARCASM_CSV, drop_conflicts=True, log=messages.append)
    text = " ".join(messages)
    assert "1 row(s) with an empty text" in text
    assert "conflicting labels" in text and "duplicated" in text
    assert frame.text.map(normalise).is_unique
    # Line breaks inside quoted fields stay inside their text (the file has LF line ends only, no CRLF).
    assert frame.text.str.contains("\n").sum() == 232 and not frame.text.str.contains("\r").any()


def test_isarcasmeval_as_distributed_reads_with_its_conflicts_dropped_and_named(shared_data):
    """The raw file holds texts given both labels: every labelled input drops all their copies, as `split` does,
    and says how many and which rows; --strict (split) and drop_conflicts=False make them an error."""
    messages = []
    frame = load_table(ISARCASM_CSV, log=messages.append)
    assert any(re.search(r"5 text\(s\) appear with conflicting labels \(rows 18, 25, .*\): all their copies dropped", m)
               for m in messages), messages
    assert any("row(s) with an empty text (rows 1063)" in m for m in messages), messages
    assert frame.text.map(normalise).is_unique and len(frame) > 3400
    with pytest.raises(UserError, match=r"conflicting labels \(rows 18, 25"):
        load_isarcasm(ISARCASM_CSV, drop_conflicts=False, log=lambda m: None)
    with pytest.raises(UserError, match=r"--strict"):
        load_isarcasm(ISARCASM_CSV, strict=True, log=lambda m: None)


def test_strict_makes_empty_and_duplicates_errors(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nfine,1\n,0\nfine,1\nother,0\n")
    with pytest.raises(UserError, match=r"empty text \(rows 2\)"):
        load_table(path, strict=True)
    frame = load_table(path, log=lambda m: None)
    assert frame.text.tolist() == ["fine", "other"]


def test_missing_columns_name_found_and_expected(tmp_path):
    path = write(tmp_path, "g.csv", "class,text\nsarc,hello\n")
    with pytest.raises(UserError) as err:
        load_gen(path)
    assert "missing column(s) ['id']" in str(err.value) and "Found columns: ['class', 'text']" in str(err.value)
    path = write(tmp_path, "x.csv", "body,y\nhello,1\n")
    with pytest.raises(UserError) as err:
        load_table(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unrecognised columns")  # names the file, like the other data errors
    assert "Found columns: ['body', 'y']" in message and "generic (text, label)" in message


def test_unknown_labels_list_rows(tmp_path):
    path = write(tmp_path, "l.csv", "text,label\na,1\nb,maybe\nc,0\nd,2\n")
    with pytest.raises(UserError, match=r"2 row\(s\) have unknown label values \['2', 'maybe'\] \(rows 2, 4"):
        load_table(path)


def test_generic_label_words_and_jsonl(tmp_path):
    path = write(tmp_path, "w.jsonl", '{"text": "a", "label": "sarcastic"}\n{"text": "b", "label": "no"}\n')
    frame = load_table(path)
    assert frame.label.tolist() == [1, 0] and frame.id.tolist() == ["1", "2"]


def test_tab_separated_files_read_as_tables(tmp_path):
    for name in ("t.tsv", "t.tab"):
        path = write(tmp_path, name, "text\tlabel\nOh, great.\t1\nfine\t0\n")
        assert load_table(path).text.tolist() == ["Oh, great.", "fine"]


def test_jsonl_blank_lines_skipped_and_values_read_as_text(tmp_path):
    path = write(tmp_path, "v.jsonl", '{"text": "a", "label": 1}\n\n{"text": 7, "label": true}\n{"text": "c", "label": 0.0}\n')
    frame = load_table(path)
    assert frame.text.tolist() == ["a", "7", "c"] and frame.label.tolist() == [1, 1, 0]


def test_public_datasets_read_as_distributed(tmp_path):
    """News Headlines: JSON lines in a .json file; SARC: a CSV whose text is `comment`."""
    headlines = write(tmp_path, "Sarcasm_Headlines_Dataset.json",
                      '{"article_link": "u1", "headline": "area man wins", "is_sarcastic": 1}\n'
                      '{"article_link": "u2", "headline": "rates rise", "is_sarcastic": 0}\n')
    sarc = write(tmp_path, "train-balanced-sarcasm.csv",
                 "label,comment,author,subreddit,parent_comment\n0,fine idea,a,b,p\n1,oh sure,a,b,p\n")
    array = write(tmp_path, "array.json", '[{"text": "x", "label": "yes"}, {"text": "y", "label": "no"}]')
    for path, texts, labels in ((headlines, ["area man wins", "rates rise"], [1, 0]),
                                (sarc, ["fine idea", "oh sure"], [0, 1]), (array, ["x", "y"], [1, 0])):
        frame = load_table(path)
        assert frame.text.tolist() == texts and frame.label.tolist() == labels, path.name


@pytest.mark.parametrize("content,match", [
    ('{"text": "a", "label": 1}\nnot json\n', r"line 2 is not valid JSON"),
    ('{"text": "a", "label": 1}\n\n["b", 0]\n', r"line 3 is a JSON list, not an object"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, match):
    with pytest.raises(UserError, match=match):
        load_table(write(tmp_path, "b.jsonl", content))


@pytest.mark.parametrize("content,match", [
    (None, "not found"), ("", "empty"), ("text,label\n", "no rows"), ("text,label\n,1\n,0\n", "no text at all"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "f.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_table(path, log=lambda m: None)


def test_conflicting_labels_name_rows(tmp_path):
    path = write(tmp_path, "c.csv", "text,label\nSame  text,1\nother,0\nsame text,0\n")
    messages = []
    assert load_table(path, log=messages.append).text.tolist() == ["other"]
    assert messages == [f"{path}: 1 text(s) appear with conflicting labels (rows 1, 3): all their copies dropped."]
    with pytest.raises(UserError, match=r"1 text\(s\) appear with conflicting labels \(rows 1, 3\)"):
        load_table(path, drop_conflicts=False)
    # Nothing left: an error, not an empty table that a later stage would call "one class only".
    with pytest.raises(UserError, match="every text of the file is given both labels"):
        load_table(write(tmp_path, "all.csv", "text,label\na,1\na,0\n"), log=lambda m: None)


def test_splits_are_stratified_deterministic_and_leak_free(shared_data):
    quiet = dict(log=lambda m: None)
    gen, isarcasm = load_gen(GEN_CSV, **quiet), load_isarcasm(ISARCASM_CSV, drop_conflicts=True, **quiet)
    a = make_splits(gen, isarcasm)
    b = make_splits(gen, isarcasm)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert len(a["gen_test"]) == 1304  # 20% of GEN
    assert len(a["gen_train"]) + len(a["gen_val"]) == len(gen) - 1304
    for name in ("gen_train", "gen_val", "gen_test"):
        assert abs(a[name].label.mean() - 0.5) < 0.01
    assert abs(a["isarcasm_train"].label.mean() - a["isarcasm_val"].label.mean()) < 0.01
    assert not set(a["isarcasm_train"].text) & set(a["isarcasm_val"].text)  # val differs from train
    other = make_splits(gen, isarcasm, seed=7)
    assert set(other["gen_test"].id) != set(a["gen_test"].id)


def test_leakage_check_fails_loudly():
    one = pd.DataFrame({"text": ["Oh  GREAT idea", "x"], "label": [1, 0]})
    two = pd.DataFrame({"text": ["oh great idea"], "label": [1]})
    with pytest.raises(UserError, match="Leakage: 1 text"):
        check_no_leakage({"train": one, "test": two})


def test_samples_are_seeded_and_shaped():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [1] * 20 + [0] * 80})
    s1, s2 = stratified_sample(frame, 50, 1), stratified_sample(frame, 50, 1)
    assert s1.equals(s2) and len(s1) == 50 and s1.label.sum() == 10
    bal = balanced_sample(frame, 30, 3)
    assert len(bal) == 30 and bal.label.sum() == 15
    assert len(balanced_sample(frame, 60, 3)) == 60 and balanced_sample(frame, 60, 3).label.sum() == 20  # all positives


def test_split_command_and_script(shared_data, tmp_path, capsys):
    out = tmp_path / "splits"
    cmd = ["split_gen_dataset.py", "--data_dir", str(shared_data), "--output_dir", str(out), "--no_wandb"]
    code = run_script(*cmd)
    done = capsys.readouterr()
    assert code == 0, done.err
    assert "gen_test" in done.out and "1304" in done.out
    info = json.loads((out / "split_info.json").read_text())
    assert info["splits"]["gen_test"]["total"] == 1304
    assert (out / "COMPLETE.json").is_file()
    first = (out / "gen_train.csv").read_bytes()
    # Same settings again: allowed and byte-identical. Other settings: refused, nothing overwritten.
    assert run_script(*cmd) == 0
    assert (out / "gen_train.csv").read_bytes() == first
    code = run_script(*cmd, "--seed", "3")
    refused = capsys.readouterr()
    assert code == 2 and "--overwrite" in refused.err and "Traceback" not in refused.err
    assert (out / "gen_train.csv").read_bytes() == first


@pytest.mark.parametrize("content,match", [
    ('{"text": "a", "label": 1', r"not valid JSON \(Expecting"),
    ('[1, 2]', "must hold an array of objects"),
    ('"text"', "must hold an array of objects"),
])
def test_bad_json_documents_say_what_is_wrong(tmp_path, content, match):
    with pytest.raises(UserError, match=match):
        load_table(write(tmp_path, "d.json", content))


def test_a_json_object_of_columns_reads_as_a_table(tmp_path):
    path = write(tmp_path, "cols.json", '{"text": {"0": "a", "1": "b"}, "label": {"0": 1, "1": 0}}')
    frame = load_table(path)
    assert frame.text.tolist() == ["a", "b"] and frame.label.tolist() == [1, 0]
    one = write(tmp_path, "one.json", '{"text": "a", "label": 1}')  # a single record is a one-row table
    assert load_table(one).text.tolist() == ["a"]


# --- what pandas would read silently wrong: each is read right, or refused with the rows named ----------------

def test_rows_longer_than_the_header_are_refused_not_shifted(tmp_path):
    """pandas turns the extra first field into the row index: every column read one to the left."""
    for name, text in (("trailing.csv", "text,label\nhello there,1,\nbye now,0,\n"),
                       ("comma.csv", "text,label\nhello, world,1\nplain,0\n")):
        with pytest.raises(UserError, match="more fields than its header .* quoted"):
            load_table(write(tmp_path, name, text))


def test_a_column_named_twice_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"names column\(s\) \['text'\] more than once"):
        load_table(write(tmp_path, "dup.csv", "text,text,label\na,b,1\nc,d,0\n"))


def test_na_none_and_nan_are_texts_only_empty_cells_are_missing(tmp_path):
    frame = load_table(write(tmp_path, "na.csv", "text,label\nN/A,1\nnan,0\nNone,1\nnull,0\n,1\n"), log=lambda m: None)
    assert frame.text.tolist() == ["N/A", "nan", "None", "null"]


def test_blank_and_other_unknown_labels_are_listed_together(tmp_path):
    with pytest.raises(UserError, match=r"4 row\(s\) have unknown label values \['\(blank\)', '-1', '0.5', '2'\] "
                                        r"\(rows 2, 3, 4, 5; .*\) in column 'label'"):
        load_table(write(tmp_path, "labels.csv", "text,label\na,TRUE\nb,2\nc,-1\nd,0.5\ne,\n"))


def test_tab_separated_quotes_are_text_unless_the_file_is_quoted_csv_style(tmp_path):
    plain = write(tmp_path, "plain.tsv", 'text\tlabel\n"Great" she said\t1\n"Oh sure\t1\nmaybe" he said\t0\n')
    assert load_table(plain).text.tolist() == ['"Great" she said', '"Oh sure', 'maybe" he said']
    # As pandas writes it: a field holding a quote (or a line break) is quoted, inner quotes doubled.
    frame = pd.DataFrame({"text": ['"Great" she said', "two\nlines", "plain"], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "pandas.tsv", sep="\t", index=False)
    assert load_table(tmp_path / "pandas.tsv").text.tolist() == ['"Great" she said', "two\nlines", "plain"]


def test_json_objects_and_arrays_where_a_text_belongs_are_refused(tmp_path):
    lines = write(tmp_path, "n.jsonl", '{"text": {"x": 1}, "label": 1}\n\n{"text": "b", "label": 0}\n')
    with pytest.raises(UserError, match=r"1 record\(s\) hold a JSON object or array in the text column 'text' "
                                        r"\(records 1; record 1 = the first object"):
        load_table(lines)
    # One record whose other field is an array is one row, not a row per array item.
    one = write(tmp_path, "one.json", '{"text": "hello", "label": 1, "tags": ["a", "b", "c"]}')
    assert load_table(one).text.tolist() == ["hello"]
    # An object of columns keyed by names, not numbers: rows are still counted from 1.
    keyed = write(tmp_path, "keyed.json", '{"text": {"a": "x", "b": "y"}, "label": {"a": 1, "b": "maybe"}}')
    with pytest.raises(UserError, match=r"unknown label values \['maybe'\] \(records 2;"):
        load_table(keyed)


def test_columns_of_two_formats_are_refused_not_guessed(tmp_path):
    with pytest.raises(UserError, match="fit more than one format: isarcasmeval .*generic"):
        load_table(write(tmp_path, "two.csv", "text,label,tweet,sarcastic\na,1,b,0\n"))
    with pytest.raises(UserError, match="fit more than one format: gen .*generic"):
        load_table(write(tmp_path, "cls.csv", "text,label,class\na,1,sarc\n"))


def test_stratified_sample_of_too_few_rows_for_the_ratio_is_a_plain_draw():
    frame = pd.DataFrame({"text": list("abcd"), "label": [1, 1, 1, 0]})
    for n in (1, 2, 3):
        sample = stratified_sample(frame, n, 0)
        assert len(sample) == n and set(sample.text) <= set(frame.text)
    even = pd.DataFrame({"text": list("abcdefgh"), "label": [1, 0] * 4})
    assert sorted(stratified_sample(even, 4, 0).label) == [0, 0, 1, 1]  # the ratio kept where it can be


def test_json_in_a_file_named_as_a_table_says_so(tmp_path):
    with pytest.raises(UserError, match="holds JSON, but its name says comma-separated table: rename it .json"):
        load_table(write(tmp_path, "j.csv", '[{"text": "hello", "label": 1}]\n'))


# --- a stray quote, quotes in a TSV, NUL in decoded text, header spelling --------------------------------------

@pytest.mark.parametrize("name,content,where", [
    # pandas read this as 3 rows, the first 'Sure thing,0\nok"' labelled 1.
    ("into_a_quote.csv", 'text,label\n"Sure thing,0\n"ok",1\nnormal,0\nanother one,1\n',
     r"opens on line 2 of the file \(row 1;.*closes it, on line 3, is followed by more text"),
    ("to_the_end.csv", 'text,label\nfine,1\n"Sure thing,0\nok,1\n', r"opens on line 3 .*row 2;.*never closed"),
    # Valid CSV: the stray quote closes cleanly three lines on; line 3 inside it is a whole row of the file.
    ("closes_cleanly.csv", 'text,label\n"Sure thing,0\nok,1\nnormal,0\nhe said hi",1\nx,0\n',
     r"row 1 .*lines 2-5 of the file, and line 2 inside it, 'Sure thing,0', reads as a row of its own"),
    ("gen_layout.csv", 'class,id,text\nsarc,1,"Sure thing\nnotsarc,2,other text\nnotsarc,3,he said hi"\nsarc,4,ok\n',
     r"line 3 inside it, 'notsarc,2,other text', reads as a row of its own \(3 fields, class 'notsarc'\)"),
])
def test_a_stray_quote_is_refused_with_its_row_and_line_not_merged(tmp_path, name, content, where):
    with pytest.raises(UserError, match=where) as err:
        load_table(write(tmp_path, name, content), log=lambda m: None)
    assert str(err.value).startswith(str(tmp_path / name)) and "stray opening quote" in str(err.value)


def test_multi_line_quoted_texts_still_read_whole(tmp_path):
    """Texts with line breaks inside closed quotes, commas, quotes and label-like words in them, as pandas writes
    them (the real GEN and iSarcasmEval files, over 1,500 such texts, are read by the tests above)."""
    texts = ["Oh, great\nanother Monday", 'He said "sure"\nand left,\n1', "Yes, no\nmaybe", "plain", "No,\n0"]
    frame = pd.DataFrame({"text": texts, "label": [1, 0, 1, 0, 1]})
    frame.to_csv(tmp_path / "multi.csv", index=False)
    loaded = load_table(tmp_path / "multi.csv")
    assert loaded.text.tolist() == texts and loaded.label.tolist() == [1, 0, 1, 0, 1]


def test_a_whole_quotation_in_a_tsv_keeps_its_quotes(tmp_path):
    plain = write(tmp_path, "w.tsv", 'text\tlabel\n"Best. Day. Ever."\t1\nThe bus is late\t0\n')
    assert load_table(plain).text.tolist() == ['"Best. Day. Ever."', "The bus is late"]
    # A writer that quotes every text quotes the header too (R's write.table, csv.QUOTE_ALL): CSV quoting.
    every = write(tmp_path, "r.tsv", '"text"\t"label"\n"Best. Day. Ever."\t"1"\n"The bus is late"\t"0"\n')
    assert load_table(every).text.tolist() == ["Best. Day. Ever.", "The bus is late"]
    frame = pd.DataFrame({"text": ['"Best. Day. Ever."', "two\tcolumns", "plain"], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "minimal.tsv", sep="\t", index=False)  # quotes only the fields that need it
    assert load_table(tmp_path / "minimal.tsv").text.tolist() == frame.text.tolist()
    mixed = write(tmp_path, "mixed.tsv", 'text\tlabel\n"He said ""hi"""\t1\n"Best. Day. Ever."\t0\n')
    with pytest.raises(UserError, match=r"mixed.tsv: its quotes are mixed. Line 2 .* line 3 quotes one a CSV writer "
                                        r"would leave bare \('Best. Day. Ever.'\)"):
        load_table(mixed)


@pytest.mark.parametrize("name,content,match", [
    ("n.jsonl", '{"text": "a", "label": 1}\n{"text": "b\\u0000c", "label": 0}\n',
     r"1 record\(s\) hold a NUL character \(\\u0000\) in column 'text' \(records 2;"),
    ("n.json", '[{"text": "a", "label": "1\\u0000"}, {"text": "b", "label": 0}]', r"in column 'label' \(records 1;"),
    ("k.jsonl", '{"te\\u0000xt": "a", "label": 1}\n', r"the column name .* holds a NUL character"),
    ("raw.csv", "text,label\na\x00b,1\n", r"holds a NUL byte"),  # the bytes' check, before any parsing
])
def test_a_nul_is_refused_in_every_format_escaped_or_not(tmp_path, name, content, match):
    with pytest.raises(UserError, match=match):
        load_table(write(tmp_path, name, content))


def test_header_names_match_ignoring_case_and_surrounding_spaces(tmp_path):
    for name, content in (("cap.csv", "Text,Label\nhi,1\nyo,0\n"), ("spaced.csv", " text, label\nhi, 1\nyo, 0\n"),
                          ("gen.csv", "Class,ID,Text\nsarc,1,hi\nnotsarc,2,yo\n")):
        frame = load_table(write(tmp_path, name, content))
        assert frame.text.str.strip().tolist() == ["hi", "yo"] and frame.label.tolist() == [1, 0], name
    # Two columns that fold to one name: neither is guessed, and the error says why.
    with pytest.raises(UserError, match=r"unrecognised columns.*\['Text', 'TEXT'\] all read as 'text'"):
        load_table(write(tmp_path, "two.csv", "Text,TEXT,Label\na,b,1\n"))


def test_texts_of_a_file_as_distributed_skip_its_empty_ones_when_asked(shared_data):
    """predict's reader: the raw iSarcasmEval file has one empty tweet (row 1063); by default an error naming
    it, with skip_empty left out and named, every other row kept in file order."""
    from sarcasm_dpo.data import read_frame, text_column

    frame = read_frame(ISARCASM_CSV)
    with pytest.raises(UserError, match=r"1 row\(s\) with an empty text \(rows 1063;.*Remove them or fill them in"):
        text_column(frame, ISARCASM_CSV)
    notes = []
    texts = text_column(frame, ISARCASM_CSV, skip_empty=True, log=notes.append)
    assert len(texts) == len(frame) - 1 and 1062 not in texts.index and texts.index.is_monotonic_increasing
    assert notes == [f"{ISARCASM_CSV}: 1 row(s) with an empty text (rows 1063; row 1 = the first row after the "
                     "header): skipped; every other row is scored, in file order."]
    with pytest.raises(UserError, match="nothing to score"):
        text_column(pd.DataFrame({"text": [" ", None]}), "blank.csv", skip_empty=True)
