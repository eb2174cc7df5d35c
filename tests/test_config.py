"""config.yaml: a run writes its resolved configuration; `run --config` reruns it; flags override the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from transferlab.cli import build_parser, main
from transferlab.config import ConfigError, given_dests, load

from .conftest import make_imagefolder, tiny_study

TINY = [
    "--backbone",
    "test_efficientnet",
    "--weights",
    "random",
    "--input-size",
    "32x40",
    "--no-progress",
    "--workers",
    "0",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("config")
    data = make_imagefolder(
        tmp / "data", {"train": {"ant": 12, "bee": 8, "cat": 5}, "test": {"ant": 4, "bee": 3, "cat": 2}}
    )
    out = tmp / "run1"
    assert (
        main(
            [
                "run",
                str(data),
                "--out",
                str(out),
                *TINY,
                "--cache-dir",
                str(tmp / "cache"),
                "--epochs",
                "3",
                "--valid-fraction",
                "0.25",
                "--seed",
                "1",
                "--methods",
                "softmax,svm",
            ]
        )
        == 0
    )
    return tmp, out


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _scores(m: dict) -> dict:
    keys = (
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "balanced_accuracy",
        "per_class",
        "confusion_matrix",
        "valid",
        "params",
    )
    return {n: {k: r.get(k) for k in keys} for n, r in m["methods"].items()}


def test_config_yaml_is_resolved(first_run):
    tmp, out = first_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"] == str((tmp / "data").resolve())
    assert cfg["backbone"] == "test_efficientnet" and cfg["weights"] == "random"
    assert cfg["input_size"] == [32, 40] and cfg["precision"] in ("fp32", "bf16")  # 'auto' resolved
    assert cfg["seed"] == 1 and cfg["epochs"] == 3 and cfg["valid_fraction"] == 0.25
    assert list(cfg["methods"]) == ["softmax", "svm"]
    assert cfg["methods"]["softmax"]["lr"] == pytest.approx(1e-4) and cfg["methods"]["svm"]["gamma_scale"] == 1.0
    assert "seed" not in cfg["methods"]["softmax"] and "random_state" not in cfg["methods"]["svm"]  # set by `seed`
    assert "out" not in cfg and "progress" not in cfg


def test_rerun_from_config_gives_identical_metrics(first_run):
    tmp, out = first_run
    again = tmp / "run2"
    assert main(["run", "--config", str(out / "config.yaml"), "--out", str(again), "--no-progress"]) == 0
    a, b = _metrics(out), _metrics(again)
    assert _scores(a) == _scores(b)
    for key in ("classes", "n_train", "n_valid", "n_test", "seed", "input_size", "backbone", "weights_digest"):
        assert a[key] == b[key], key
    assert (out / "methods/softmax/predictions.csv").read_text() == (
        again / "methods/softmax/predictions.csv"
    ).read_text()
    assert (out / "config.yaml").read_text() == (again / "config.yaml").read_text()


def test_flags_override_the_file_and_file_hyperparameters_apply(first_run):
    tmp, out = first_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["seed"], cfg["epochs"] = 5, 4
    cfg["methods"]["svm"]["C"] = 0.05
    edited = tmp / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    run3 = tmp / "run3"
    # --seed 0 is argparse's default value, yet given explicitly it must still win over the file's 5
    assert main(["run", "--config", str(edited), "--out", str(run3), "--seed", "0", "--methods", "svm"]) == 0
    m = _metrics(run3)
    assert m["seed"] == 0 and list(m["methods"]) == ["svm"]
    assert m["methods"]["svm"]["params"]["C"] == pytest.approx(0.05)  # from the file
    written = yaml.safe_load((run3 / "config.yaml").read_text())
    assert written["seed"] == 0 and written["epochs"] == 4 and written["methods"]["svm"]["C"] == pytest.approx(0.05)


def test_given_dests_sees_explicit_defaults():
    assert given_dests(build_parser(), ["run", "--config", "c.yaml", "--seed", "0", "--no-progress"]) >= {
        "config",
        "seed",
        "no_progress",
    }
    assert "epochs" not in given_dests(build_parser(), ["run", "--config", "c.yaml"])
    assert "data" not in given_dests(build_parser(), ["run", "--config", "c.yaml"])


def test_bad_config_files_are_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load(bad)
    assert main(["run", "--config", str(bad)]) == 2
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert main(["run", "--no-progress"]) == 2
    assert "give DATA" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("data: x\nmethods: softmax, svm\ninput_size: 64x80\n")
    kw = load(listed)
    assert kw["methods"] == ["softmax", "svm"] and kw["input_size"] == (64, 80)


@pytest.mark.parametrize(
    "value, expected",
    [("224", (224, 224)), ("[224, 300]", (224, 300)), ("auto", "auto"), ("'96x128'", (96, 128)), ("[224, x]", None)]
    + [(v, None) for v in ("2.5", "[4, 4]", "true", "{h: 1}", "[1, 2, 3]")],
)
def test_config_input_size_is_a_size_or_an_error_naming_the_value(tmp_path, capsys, value, expected):
    """`input_size: 224` in a config file was a TypeError traceback from load_backbone after the data was read."""
    f = tmp_path / "c.yaml"
    f.write_text(f"data: x\ninput_size: {value}\n")
    if expected is not None:
        assert load(f)["input_size"] == expected
        return
    with pytest.raises(ConfigError, match=r"c\.yaml: input"):
        load(f)
    assert main(["run", "--config", str(f)]) == 2
    assert "c.yaml: input" in capsys.readouterr().err


def test_cv_from_the_command_line_is_the_protocol_used_over_a_config_file(first_run, recwarn):
    """Issue 18, bug 1: config.yaml used to store `cv` (and holdout, n_jobs, n_threads) under every tuned head and
    re-apply it, so `--config c.yaml --cv 2` tuned on the validation split while reporting 2-fold CV."""
    tmp, _ = first_run
    data = tmp / "data"
    common = [*TINY, "--cache-dir", str(tmp / "cache"), "--epochs", "3", "--valid-fraction", "0.25"]
    plain = tmp / "tuned0"
    assert main(["run", str(data), "--out", str(plain), *common, "--methods", "logreg,ensemble"]) == 0
    written = yaml.safe_load((plain / "config.yaml").read_text())
    assert not {"cv", "holdout", "n_jobs", "n_threads"} & set(written["methods"]["logreg"] or {})
    cv2 = tmp / "tuned2"
    assert main(["run", "--config", str(plain / "config.yaml"), "--out", str(cv2), "--cv", "2", "--no-progress"]) == 0
    m = _metrics(cv2)
    assert m["methods"]["logreg"]["tuning"]["validation"] == "2-fold CV on train + valid"
    assert m["methods"]["ensemble"]["tuning"]["validation"] == "2-fold CV on train + valid"  # nested
    assert m["selection"]["protocol"] == "2-fold CV on train + valid"
    back = tmp / "tuned_back"  # and from a --cv 2 study back to the validation split (used to crash `ensemble`)
    assert main(["run", "--config", str(cv2 / "config.yaml"), "--out", str(back), "--cv", "0", "--no-progress"]) == 0
    assert _metrics(back)["methods"]["logreg"]["tuning"]["validation"] == "validation split"


def test_protocol_keys_in_an_old_config_are_ignored_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": "x", "methods": {"logreg": {"cv": 0, "holdout": 0.2}, "svm": {"C": 2.0}}}))
    with pytest.warns(UserWarning, match="methods.logreg.cv"):
        kw = load(old)
    assert kw["params"] == {"logreg": {}, "svm": {"C": 2.0}}


@pytest.mark.parametrize(
    "line, says",
    [
        ("tta: yes_please", "tta must be true or false, got 'yes_please'"),
        ("weights: 12", "weights must be text, got 12"),
        ("backbone: [a]", "backbone must be text"),
        ("devices: many", "devices must be auto, a number of devices"),
        ("finetune: 3", "finetune must be a mapping"),
        ("params: 5", "params must be a mapping"),
        ("methods: {svm: {C: big}}", "methods.svm.C must be a float like its default 1.0, got 'big'"),
        ("methods: {svm: {Cc: 1}}", "methods.svm.Cc is not a hyperparameter of svm (known: C, "),
        ("methods: {svm: {probability: 1}}", "methods.svm.probability must be true or false"),
        ("params: {nope: {a: 1}}", "unknown method 'nope'"),
    ],
)
def test_config_types_and_head_hyperparameters_are_checked_before_any_work(tmp_path, capsys, monkeypatch, line, says):
    """Each was a traceback (some after the extraction) or, for tta, a string taken for true."""
    import transferlab.study

    def never(*a, **k):
        raise AssertionError("the study started")

    monkeypatch.setattr(transferlab.study, "run_study", never)
    f = tmp_path / "c.yaml"
    f.write_text(f"data: {tmp_path}\n{line}\n")
    assert main(["run", "--config", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"transferlab: error: {f}: ") and says in err, err


def test_devices_flag_is_checked_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["run", "data", "--devices", "many"])
    assert (
        "--devices: must be auto, a number of devices, -1 (all) or ids like 0,1, got 'many'" in capsys.readouterr().err
    )
    from transferlab.cli import _devices

    assert [_devices(t) for t in ("auto", "2", "-1", "0,1", "1,")] == ["auto", "2", "-1", "0,1", "1,"]


def test_a_hyperparameter_the_fit_refuses_is_a_config_error_naming_the_method(tmp_path, small_folder, cache_dir):
    """`methods: {svm: {C: -1.0}}` has the default's kind; scikit-learn refuses it in the fit: a config error, not
    its InvalidParameterError traceback."""
    from transferlab.study import run_study

    cfg = tiny_study(small_folder, tmp_path / "out", cache_dir, data_efficiency=False, methods=["svm"])
    cfg.params = {"svm": {"C": -1.0}}
    with pytest.raises(ConfigError, match=r"methods\.svm \{'C': -1\.0\} .*'C' parameter of SVC"):
        run_study(cfg)


def test_a_config_files_home_relative_paths_are_the_home_folders(tmp_path, monkeypatch):
    """`out: ~/runs/x` in a config file made a folder named "~" in the working directory."""
    from transferlab.study import StudyConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = tmp_path / "c.yaml"
    f.write_text("data: ~/data\nout: ~/runs/x\ncache_dir: ~/cache\nweights: ~/w.pth\n")
    cfg = StudyConfig(**load(f))
    home = str(tmp_path / "home")
    assert (cfg.data, cfg.out, cfg.cache_dir, cfg.weights) == tuple(
        f"{home}/{p}" for p in ("data", "runs/x", "cache", "w.pth")
    )
    assert StudyConfig(data="d", weights="resnet50.tv_in1k").weights == "resnet50.tv_in1k"
