import json
from collections import Counter

import pytest

from pgkd.data import LabelledTexts, check_labels, load_labelled, paper_splits, stratified_split
from pgkd.errors import DataError


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def balanced(n_per_class, classes=("a", "b", "c", "d")):
    labels = [c for c in classes for _ in range(n_per_class)]
    return LabelledTexts([f"{label} text {i}" for i, label in enumerate(labels)], labels)


# --- LabelledTexts --------------------------------------------------------------


def test_labelled_texts_is_immutable_and_parallel():
    texts = ["x", "y"]
    d = LabelledTexts(texts, ["1", "2"])
    texts.append("z")
    assert d.texts == ("x", "y")
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        LabelledTexts(["x", "y"], ["1"])


# --- load_labelled --------------------------------------------------------------


def test_load_csv_joins_text_columns_and_skips_empty_parts(tmp_path):
    path = write_csv(
        tmp_path / "news.csv",
        "label,title,description\n3,Fears for pension,Unions say they are disappointed\n4,,Only a description\n",
    )
    data = load_labelled(path, ["title", "description"], "label")
    assert data.texts == ("Fears for pension. Unions say they are disappointed", "Only a description")
    assert data.labels == ("3", "4")


def test_load_csv_single_text_column_as_string(tmp_path):
    path = write_csv(tmp_path / "b.csv", "\ufefftext,category\nhello,x\nbye,y\n")  # BOM from a spreadsheet
    assert load_labelled(path, "text", "category").texts == ("hello", "bye")


def test_load_jsonl_with_numeric_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"t": "a", "d": "b", "y": 1}, {"t": "c", "d": None, "y": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    data = load_labelled(path, ["t", "d"], "y")
    assert data.texts == ("a. b", "c")
    assert data.labels == ("1", "2")


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"^data file not found: .*nope\.csv$"):
        load_labelled(tmp_path / "nope.csv", "text", "label")


def test_load_unknown_extension(tmp_path):
    path = write_csv(tmp_path / "d.tsv", "text\tlabel\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, "text", "label")
    assert str(err.value) == "unsupported data file 'd.tsv': expected a .csv or .jsonl file"


def test_load_missing_column_names_the_available_ones(tmp_path):
    path = write_csv(tmp_path / "d.csv", "text,category\nhello,x\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, "text", "label")
    assert str(err.value) == "column 'label' not found in d.csv; available columns: text, category"


def test_load_missing_column_in_a_jsonl_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_labelled(path, "text", "label")
    assert str(err.value) == "column 'label' not found in row 2 of d.jsonl; available columns: text"


def test_load_empty_text_says_which_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", "title,body,label\na,b,x\n , ,y\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, ["title", "body"], "label")
    assert str(err.value) == "empty text in row 2 of d.csv (columns title, body)"


def test_load_empty_label_says_which_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", "text,label\na,x\nb,\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, "text", "label")
    assert str(err.value) == "empty label in row 2 of d.csv (column label)"


def test_load_single_class(tmp_path):
    path = write_csv(tmp_path / "d.csv", "text,label\na,x\nb,x\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, "text", "label")
    assert str(err.value) == "d.csv has 1 class in column 'label'; at least 2 classes are needed"


def test_load_no_rows(tmp_path):
    with pytest.raises(DataError, match="^d.csv has no data rows$"):
        load_labelled(write_csv(tmp_path / "d.csv", "text,label\n"), "text", "label")
    with pytest.raises(DataError, match="^e.csv is empty; expected a header row and data rows$"):
        load_labelled(write_csv(tmp_path / "e.csv", ""), "text", "label")


def test_load_bad_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^line 2 of d.jsonl is not valid JSON: "):
        load_labelled(path, "text", "label")


def test_check_labels_names_the_set_and_the_label():
    train = LabelledTexts(["a", "b"], ["x", "y"])
    check_labels(train, LabelledTexts(["c"], ["x"]))
    with pytest.raises(DataError) as err:
        check_labels(train, LabelledTexts(["c"], ["x"]), LabelledTexts(["d", "e"], ["w", "z"]), names=["val", "test"])
    assert str(err.value) == "test has 2 labels not in the training data: 'w', 'z'; every label must appear in train"


# --- splits ---------------------------------------------------------------------


def test_stratified_split_is_seeded_disjoint_and_proportional():
    data = balanced(10)
    rest, test = stratified_split(data, 0.2, seed=1)
    assert len(test) == 8 and len(rest) == 32
    assert set(rest.texts).isdisjoint(test.texts)
    assert Counter(test.labels) == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert stratified_split(data, 0.2, seed=1) == (rest, test)
    assert stratified_split(data, 0.2, seed=2) != (rest, test)


def test_stratified_split_keeps_small_classes_on_both_sides():
    labels = ["big"] * 40 + ["two"] * 2 + ["three"] * 3 + ["one"]
    data = LabelledTexts([str(i) for i in range(len(labels))], labels)
    rest, test = stratified_split(data, 0.1, seed=0)
    assert len(test) == 5  # round(0.1 * 46)
    for cls in ("two", "three"):
        assert cls in test.labels and cls in rest.labels


def test_paper_splits_with_a_separate_test_set():
    data = balanced(50)  # 200 samples
    test = balanced(3)
    s = paper_splits(data, n_seed=40, val_fraction=0.2, seed=0, test=test)
    assert s.sizes() == {"train": 32, "val": 8, "pool": 160, "test": 12}
    assert Counter(s.val.labels) == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert s.test is test
    parts = [set(s.train.texts), set(s.val.texts), set(s.pool.texts)]
    assert set().union(*parts) == set(data.texts)
    assert sum(map(len, parts)) == len(data)  # disjoint
    assert paper_splits(data, n_seed=40, seed=0, test=test) == s
    # n_test with a given test set: a stratified subsample of it
    small = paper_splits(data, n_seed=40, seed=0, test=balanced(10), n_test=8).test
    assert Counter(small.labels) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_paper_splits_carves_a_test_set():
    data = balanced(50)
    s = paper_splits(data, n_seed=40, n_test=20, seed=3)
    assert s.sizes() == {"train": 32, "val": 8, "pool": 140, "test": 20}
    assert Counter(s.test.labels) == {"a": 5, "b": 5, "c": 5, "d": 5}
    all_texts = s.train.texts + s.val.texts + s.pool.texts + s.test.texts
    assert sorted(all_texts) == sorted(data.texts)


def test_paper_splits_rejects_bad_sizes():
    data = balanced(5)
    with pytest.raises(DataError, match="needs a test set"):
        paper_splits(data, n_seed=8)
    with pytest.raises(DataError, match=r"^n_seed=100 must be between 2 and 16 "):
        paper_splits(data, n_seed=100, n_test=4)


def test_write_labelled_round_trips_through_load_labelled(tmp_path):
    from pgkd.data import LabelledTexts, load_labelled, write_labelled

    data = LabelledTexts(('a "quoted", text', "línea\ntwo", "third"), ("x", "y", "x"))
    path = write_labelled(tmp_path / "d.csv", data)
    assert load_labelled(path, "text", "label") == data
