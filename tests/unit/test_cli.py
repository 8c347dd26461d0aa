"""The pgkd command line: bad input is one clear line and exit 2, never a traceback."""

import json
from pathlib import Path

import pytest

from pgkd.cli import main


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def files(tmp_path):
    good = [f"good thing {i},pos" for i in range(6)] + [f"bad thing {i},neg" for i in range(6)]
    return {
        "train": write_csv(tmp_path / "train.csv", good),
        "val": write_csv(tmp_path / "val.csv", good[:2] + good[-2:]),
        "unseen": write_csv(tmp_path / "unseen.csv", ["meh thing,neutral", "good one,pos"]),
        "one_class": write_csv(tmp_path / "one.csv", ["a,pos", "b,pos"]),
        "empty_text": write_csv(tmp_path / "empty.csv", ["a,pos", ",neg"]),
        "no_label": write_csv(tmp_path / "nolabel.csv", ["a", "b"], header="text"),
        "out": str(tmp_path / "out"),
    }


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "pgkd: error: data file not found: "),
        ("no_label", "pgkd: error: column 'label' not found in nolabel.csv; available columns: text"),
        ("one_class", "pgkd: error: one.csv has 1 class in column 'label'; at least 2 classes are needed"),
        ("empty_text", "pgkd: error: empty text in row 2 of empty.csv (columns text)"),
        ("unseen", "pgkd: error: "),
    ],
)
def test_train_bad_input_is_one_line(capsys, files, tiny_encoder_dir, case, expected):
    train, val = files["train"], files["val"]
    if case == "missing":
        train = files["out"] + "/nope.csv"
    elif case == "unseen":
        val = files["unseen"]
    else:
        train = files[case]
    code, out, err = run(capsys, "train", "--train", train, "--val", val, "--out", files["out"],
                         "--model", str(tiny_encoder_dir), "--epochs", "1", "--no-progress")
    assert code == 2
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_unseen_label_names_the_file(capsys, files, tiny_encoder_dir):
    err = run(capsys, "train", "--train", files["train"], "--val", files["unseen"], "--out", files["out"],
              "--model", str(tiny_encoder_dir), "--epochs", "1", "--no-progress")[2]
    assert err == (f"pgkd: error: {files['unseen']} has 1 label not in the training data: 'neutral'; "
                   "every label must appear in train\n")


def test_train_then_evaluate_round_trip(capsys, files, tiny_encoder_dir):
    code, out, _ = run(capsys, "train", "--train", files["train"], "--val", files["val"], "--out", files["out"],
                       "--model", str(tiny_encoder_dir), "--epochs", "2", "--lr", "5e-3", "--batch-size", "4",
                       "--max-length", "16", "--no-progress")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["val"]) == {"accuracy", "macro_f1", "weighted_f1"}
    report = json.loads((Path(files["out"]) / "report.json").read_text())
    assert report["train"]["n"] == 12 and report["val"]["n"] == 4

    code, out, _ = run(capsys, "evaluate", "--model", files["out"] + "/model", "--data", files["val"])
    assert code == 0
    assert json.loads(out)["accuracy"] == report["val"]["accuracy"]

    code, _, err = run(capsys, "evaluate", "--model", files["out"] + "/model", "--data", files["unseen"])
    assert code == 2 and "labels the model does not know: neutral" in err


def test_unknown_setting_stops_start_up(capsys, files, monkeypatch):
    monkeypatch.setenv("PGKD_NOT_A_SETTING", "1")
    code, _, err = run(capsys, "distill", "--train", files["train"], "--val", files["val"], "--test", files["val"],
                       "--out", files["out"], "--teacher-url", "http://127.0.0.1:1/v1", "--teacher-model", "m")
    assert code == 2
    assert err == "pgkd: error: unknown setting PGKD_NOT_A_SETTING; known settings are listed in docs/CONFIG.md\n"
