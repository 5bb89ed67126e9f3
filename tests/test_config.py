"""The house: typed configs as the one source of defaults, the error tree, named steps."""
import ast
import dataclasses
import os

import pytest

from dearkd_fast import config, invert, train
from dearkd_fast.cli import run_cli
from dearkd_fast.config import INVERSION, PRESETS, InvertConfig, TrainConfig, from_argv, preset_for
from dearkd_fast.errors import DearKDError, InputError, RunError

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("cls", [TrainConfig, InvertConfig])
def test_parser_defaults_are_the_config_defaults(cls):
    """Parsing no flags gives the dataclass's own defaults: nothing is redefined in the parser."""
    argv = ["--output", "x"] + (["--teacher-ckpt", "t.pt"] if cls is InvertConfig else [])
    parsed = from_argv(cls, argv, "p")
    made = cls(output="x", **({"teacher_ckpt": "t.pt"} if cls is InvertConfig else {}))
    assert parsed == made
    assert set(config.flat(parsed)) == {a.dest for a in config.build_parser(cls, "p", "")._actions if a.dest != "help"}


def test_configs_are_frozen_and_derive_without_writing_back():
    cfg = from_argv(TrainConfig, ["--epochs", "7", "--amp", "--data", "d", "--data-fraction", "0.5"], "p")
    assert (cfg.switch_epoch, cfg.stage1_epochs) == (5, None)  # 2/3 of 7 rounded up; the flag stays unset
    assert cfg.run.amp and cfg.data.source == "d" and cfg.data.fraction == 0.5 and cfg.data.loader == "auto"
    assert cfg.output.startswith("runs" + os.sep)  # a default computed when the config is made
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert from_argv(TrainConfig, ["--epochs", "7", "--stage1-epochs", "7"], "p").switch_epoch == 7
    assert cfg.teacher_warmup_steps(22) == 22 and TrainConfig(teacher_epochs=5).teacher_warmup_steps(22) == 11


@pytest.mark.parametrize("argv,text", [
    (["--epochs", "-1"], "--epochs"), (["--epochs", "0", "--teacher-epochs", "0"], "teacher alone"),
    (["--val-fraction", "0"], "--val-fraction"), (["--val-fraction", "1.5"], "--val-fraction"),
    (["--stage1-epochs", "30"], "--stage1-epochs"), (["--lr", "nan"], "--lr"),
    (["--data-fraction", "0"], "--data-fraction"), (["--alpha", "2"], "--alpha"), (["--tau", "-1"], "--tau"),
    (["--beta", "nan"], "--beta"), (["--max-norm", "-1"], "--max-norm"), (["--smoothing", "1.5"], "--smoothing"),
    (["--hflip", "2"], "--hflip"), (["--seed", "-1"], "--seed"), (["--device", "bogus"], "--device"),
    (["--output", ""], "--output"), (["--resume", "--overwrite"], "exclude"), (["--epochs", "x"], "invalid int"),
])
def test_bad_values_are_input_errors_naming_the_flag(argv, text):
    with pytest.raises(InputError, match=text):
        from_argv(TrainConfig, argv, "p")


def test_presets_hold_the_size_dependent_defaults():
    assert preset_for(32) is PRESETS["small"] and preset_for(64) is PRESETS["small"] and preset_for(65) is PRESETS["224"]
    cfg = from_argv(InvertConfig, ["--teacher-ckpt", "t", "--output", "o"], "p")
    assert cfg.preset == "dearkd"
    assert cfg.synthesis("a", 10, 224).r_bn == INVERSION[("dearkd", "224")].r_bn
    small = cfg.synthesis("a", 10, 32)
    assert small.r_bn == INVERSION[("dearkd", "small")].r_bn and small.bpid > 0 and small.keep == "last"
    assert small.jitter_px == round(30 * 32 / 224)  # the preset's jitter scaled to the resolution
    official = from_argv(InvertConfig, ["--teacher-ckpt", "t", "--output", "o", "--preset", "deepinversion",
                                        "--tv-l2", "0.5", "--no-flip"], "p")
    s = official.synthesis("a", 10, 224)
    assert (s.r_bn, s.tv_l2, s.resolution, s.flip, s.bpid) == (0.01, 0.5, 224, False, 0.0)
    assert (s.low_res_iterations, s.iterations, s.betas, s.warmup, s.keep) == (2000, 1000, (0.5, 0.9), 100, "best")
    cifar = official.synthesis("a", 10, 32)
    assert (cifar.low_res_iterations, cifar.iterations, cifar.betas, cifar.schedule, cifar.jitter_px, cifar.clip) == \
        (0, 2000, (0.9, 0.999), "constant", 2, False)
    # the help text states the preset values, and the loss's defaults are the public preset
    helps = {a.dest: a.help for a in config.build_parser(InvertConfig, "p", "")._actions}
    assert all(f"{INVERSION[k].r_bn:g}" in helps["r_bn"] for k in INVERSION)
    import inspect

    from dearkd_fast.losses import DeepInversionLoss
    defaults = {k: p.default for k, p in inspect.signature(DeepInversionLoss).parameters.items()}
    assert all(defaults[k] == getattr(INVERSION[("deepinversion", "224")], k)
               for k in ("r_bn", "first_bn_mult", "tv_l2", "tv_l1", "l2"))


def test_targets_are_indices_or_drawn_by_seed():
    base = ["--teacher-ckpt", "t", "--output", "o"]
    assert from_argv(InvertConfig, base + ["--targets", "3,1"], "p").synthesis("a", 5, 32).targets == (3, 1)
    drawn = [from_argv(InvertConfig, base + ["--num-targets", "3", "--seed", str(k)], "p").synthesis("a", 100, 32).targets
             for k in (0, 0, 1)]
    assert drawn[0] == drawn[1] != drawn[2] and len(set(drawn[0])) == 3 and all(0 <= t < 100 for t in drawn[0])
    assert from_argv(InvertConfig, base, "p").synthesis("a", 4, 32).targets == (0, 1, 2, 3)
    for argv, text in ((["--targets", "1,x"], "--targets"), (["--targets", "1,1"], "repeats"),
                       (["--targets", "1", "--num-targets", "2"], "not both")):
        with pytest.raises(InputError, match=text):
            from_argv(InvertConfig, base + argv, "p")
    with pytest.raises(InputError, match="does not exist"):
        from_argv(InvertConfig, base + ["--targets", "7"], "p").synthesis("a", 5, 32)
    with pytest.raises(InputError, match="exceeds"):
        from_argv(InvertConfig, base + ["--num-targets", "9"], "p").synthesis("a", 5, 32)


def _run_cli(tmp_path, capsys, exc, output=None):
    def run(cfg):
        os.makedirs(cfg.output, exist_ok=True)
        raise exc

    out = str(output or tmp_path / "o")
    rc = run_cli("prog", TrainConfig, "", run, ["--output", out])
    return rc, capsys.readouterr().err


def test_run_cli_sorts_by_the_tree(tmp_path, capsys):
    rc, err = _run_cli(tmp_path, capsys, InputError("the folder is missing"))
    assert rc == 2 and err == "prog: error: the folder is missing\n"
    rc, err = _run_cli(tmp_path, capsys, RunError("diverged\nsecond line"), tmp_path / "r")
    assert rc == 1 and err.count("\n") == 1 and "diverged" in err and "second" not in err
    log = tmp_path / "r" / "error.log"
    assert str(log) in err and "Traceback" in log.read_text() and "RunError" in log.read_text()
    rc, err = _run_cli(tmp_path, capsys, ZeroDivisionError("x"), tmp_path / "z")  # outside the tree: run time
    assert rc == 1 and "ZeroDivisionError" in (tmp_path / "z" / "error.log").read_text()
    assert issubclass(InputError, ValueError) and issubclass(RunError, RuntimeError)


def _raises(path):
    """(line, exception name) of every `raise Name(...)` in a source file."""
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            out.append((node.lineno, node.exc.func.id))
    return out


def test_every_library_raise_is_from_the_tree():
    import dearkd_fast.errors as errors

    tree = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, (DearKDError, KeyboardInterrupt))}
    bad = []
    for folder in ("dearkd_fast", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    bad += [f"{os.path.relpath(path, ROOT)}:{line} {name}" for line, name in _raises(path)
                            if name not in tree]
    assert not bad, bad


@pytest.mark.parametrize("module", [train, invert])
def test_runs_are_short_named_steps(module):
    """run() reads as a sequence of steps, and no function of either tool is over 40 lines."""
    tree = ast.parse(open(module.__file__).read())
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40]
    assert not long, long
