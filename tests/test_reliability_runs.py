"""What survives a kill, a full or read-only disk, a changed schedule and a non-finite streak.

Full disks are real where the kernel allows it without a mount: the temporary file of an atomic
save is made a symlink to ``/dev/full``, so torch's writer gets a genuine ENOSPC from the kernel
(the symlink, never the device, is what gets removed). Read-only file systems, and full disks under
safetensors' and the delta's own writers, are simulated by making the one function that opens or
writes the file raise the OSError the kernel would raise.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import videollm.checkpoint as ck
from videollm import convert, delta
from videollm.errors import StorageError
from videollm.runners import RESUME_NAME
from videollm.runners.lr_sched import LinearWarmupCosineLRScheduler
from videollm.runners.metrics import read_log

from test_apply_delta import DELTA_VOCAB, BASE_VOCAB, _save_model
from test_training import CrashingLoader, NaNTask, make_runner, tiny_config

REPO = Path(__file__).resolve().parents[1]
DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="no /dev/full character device")


def dead_pid() -> int:
    """The id of a process that has exited (what a killed run leaves in its temporary names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp_names(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic save's temporary file is a symlink to /dev/full: writes fail with a real ENOSPC."""
    real = ck._temp_sibling

    def to_dev_full(path: Path) -> Path:
        tmp = real(path)
        os.symlink(DEV_FULL, tmp)
        return tmp

    monkeypatch.setattr(ck, "_temp_sibling", to_dev_full)
    yield
    assert DEV_FULL.is_char_device()  # the device itself was never replaced


def read_only(monkeypatch, module, error=errno.EROFS):
    """``open`` for writing in ``module`` fails as on a read-only file system."""
    real = open

    def refusing_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", refusing_open, raising=False)


# ------------------------------------------------------------------------------ 2: changed schedule
def test_scheduler_keeps_the_new_hyper_parameters_and_reports_the_changes(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = LinearWarmupCosineLRScheduler(opt, max_epoch=2, iters_per_epoch=10, min_lr=1e-5, init_lr=1e-3)
    old.step(1, 3)
    new = LinearWarmupCosineLRScheduler(opt, max_epoch=4, iters_per_epoch=10, min_lr=1e-5, init_lr=1e-4)
    with caplog.at_level(logging.WARNING):
        changes = new.load_state_dict(old.state_dict())
    assert changes["run.init_lr"] == (1e-3, 1e-4) and changes["run.max_epoch"] == (2, 4)
    assert "run.min_lr" not in changes and "run.iters_per_epoch" not in changes
    assert (new.init_lr, new.max_epoch, new.last_position) == (1e-4, 4, (1, 3))
    assert opt.param_groups[0]["lr"] == pytest.approx(new.lr_at(1, 3))  # the new curve at the saved step
    assert "run.init_lr: 0.001 -> 0.0001" in caplog.text
    same = LinearWarmupCosineLRScheduler(opt, max_epoch=2, iters_per_epoch=10, min_lr=1e-5, init_lr=1e-3)
    assert same.load_state_dict(old.state_dict()) == {}


def test_resume_with_a_lower_lr_trains_at_the_lower_lr(tmp_path, caplog):
    common = dict(max_epoch=1, iters_per_epoch=4, save_freq_iters=2, init_lr=1e-3, min_lr=1e-3)
    cfg = tiny_config(tmp_path, **common)
    first = make_runner(cfg)
    first.train_loader = CrashingLoader(first.train_loader, 3)  # iterations 0-2 run, the save after 1 is kept
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    lower = tiny_config(tmp_path, **dict(common, init_lr=1e-4, min_lr=1e-4, weight_decay=0.01), auto_resume=True)
    second = make_runner(lower)
    seen = []
    step = second.optimizer.step
    second.optimizer.step = lambda *a, **k: (seen.append([(g["lr"], g["weight_decay"]) for g in second.optimizer.param_groups]),
                                              step(*a, **k))[1]
    with caplog.at_level(logging.WARNING):
        second.train()
    assert (second.start_epoch, second.start_iter) == (0, 2)  # the step counter is kept
    assert [r["iteration"] for r in read_log(tmp_path)] == [0, 1, 2, 3]
    assert [r["lr"] for r in read_log(tmp_path)][2:] == [pytest.approx(1e-4)] * 2
    assert len(seen) == 2 and all(lr == pytest.approx(1e-4) for groups in seen for lr, _ in groups)
    assert [wd for _, wd in seen[0]] == [0.01, 0.0]  # the new weight decay, not the saved 0.05
    assert "run.init_lr: 0.001 -> 0.0001" in caplog.text and "weight_decay: 0.05 -> 0.01" in caplog.text


def test_resume_with_other_epoch_sizes_continues_at_the_same_global_iteration(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_epoch=1, iters_per_epoch=4, save_freq_iters=2)
    first = make_runner(cfg)
    first.train_loader = CrashingLoader(first.train_loader, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    second = make_runner(tiny_config(tmp_path, max_epoch=2, iters_per_epoch=2, auto_resume=True))
    with caplog.at_level(logging.WARNING):
        second.train()
    assert (second.start_epoch, second.start_iter) == (1, 0)  # global iteration 2 in epochs of 2
    assert [r["iteration"] for r in read_log(tmp_path)] == [0, 1, 2, 3]
    assert "run.iters_per_epoch: 4 -> 2" in caplog.text and "run.max_epoch: 1 -> 2" in caplog.text


# ------------------------------------------------------------------------------ 11: auto-resume fallback
def test_kill_during_the_first_resume_write_falls_back_to_the_checkpoint(tmp_path, caplog, monkeypatch):
    """A kill while resume_latest.pth is first written leaves checkpoint_0.pth complete and a
    half-written temporary: the next run resumes from checkpoint_0.pth and removes the temporary."""
    import videollm.runners.runner_iter as runner_iter

    cfg = tiny_config(tmp_path, max_epoch=2, iters_per_epoch=2, auto_resume=True)
    first = make_runner(cfg)
    orphan = tmp_path / f".{RESUME_NAME}.{dead_pid()}.0123abcd.tmp"
    real_save = runner_iter.save_atomic

    class Killed(BaseException):
        pass

    def killed_during_resume_write(obj, path):
        if Path(path).name != RESUME_NAME:
            return real_save(obj, path)
        orphan.write_bytes(b"PK\x03\x04 half a zip")  # what the killed process left
        raise Killed

    monkeypatch.setattr(runner_iter, "save_atomic", killed_during_resume_write)
    with pytest.raises(Killed):
        first.train()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint_0.pth").is_file() and not (tmp_path / RESUME_NAME).exists()
    epoch0 = {k: v.clone() for k, v in first.model.trainable_state_dict().items()}

    second = make_runner(cfg, seed=7)  # other initial weights: they must come from the checkpoint
    loaded = {}
    real_load = second._load_model
    second._load_model = lambda state, path: (loaded.update(state), real_load(state, path))[1]
    with caplog.at_level(logging.INFO):
        second.train()
    assert (second.start_epoch, second.start_iter) == (1, 0)
    assert all(torch.equal(loaded[k], v) for k, v in epoch0.items())
    assert [r["iteration"] for r in read_log(tmp_path)] == [0, 1, 2, 3]
    assert not orphan.exists() and temp_names(tmp_path) == []
    assert f"removed {orphan}" in caplog.text and "resuming from" in caplog.text and "is missing" in caplog.text
    assert (tmp_path / RESUME_NAME).is_file()


KILLED_DURING_RESUME_WRITE = """
import os, signal, sys, torch
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    name = str(f) if isinstance(f, (str, os.PathLike)) else f.f.name
    if "resume_latest" in name:  # the first write of resume_latest.pth: half of it, then SIGKILL
        open(name, "ab").write(b"PK\\x03\\x04 half a zip")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
sys.path.insert(0, sys.argv[1])
import train
train.main(sys.argv[2:])
"""


@pytest.mark.slow
def test_sigkill_during_the_first_resume_write_then_auto_resume(tmp_path):
    """A real SIGKILL in the middle of writing resume_latest.pth for the first time: the next run
    resumes from checkpoint_0.pth (not from scratch) and removes the killed run's temporary."""
    out = tmp_path / "run"
    argv = ["--cfg-path", str(REPO / "train_configs/tiny_synthetic.yaml"), "--options", f"run.output_dir={out}",
            "run.max_epoch=2", "run.iters_per_epoch=1", "run.batch_size_train=2", "run.num_workers=0",
            "run.evaluate=false", "run.auto_resume=true", "datasets.synthetic_clips.build_info.val_anno_dir=null"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_RESUME_WRITE, str(REPO), *argv], env=env,
                            cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    orphans = temp_names(out)
    assert len(orphans) == 1 and orphans[0].startswith(f".{RESUME_NAME}.")
    assert (out / "checkpoint_0.pth").is_file() and not (out / RESUME_NAME).exists()
    again = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"removed {out / orphans[0]}" in again.stderr
    assert f"resuming from {out / 'checkpoint_0.pth'}" in again.stderr
    assert [r["iteration"] for r in read_log(out)] == [0, 1]  # epoch 0 was not trained again
    assert temp_names(out) == [] and ck.load_file(out / RESUME_NAME)["epoch"] == 1


def test_fallback_takes_the_newest_checkpoint_that_loads(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_epoch=2, iters_per_epoch=4, save_freq_iters=2, keep_last_checkpoints=0)
    make_runner(cfg).train()
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth"))
    assert names == ["checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_iter_2.pth", "checkpoint_iter_6.pth"]
    # a truncated resume file and a truncated newest checkpoint are both skipped
    for name in (RESUME_NAME, "checkpoint_1.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    runner = make_runner(OmegaConf.merge(cfg, {"run": {"auto_resume": True}}))
    with caplog.at_level(logging.WARNING):
        path = runner.find_resume_path()
    assert path == tmp_path / "checkpoint_iter_6.pth"
    assert "skipping" in caplog.text and "is unreadable" in caplog.text
    runner.load_resume(path)
    assert (runner.start_epoch, runner.start_iter) == (1, 2)  # mid-epoch: from the file's name


def test_stale_temporaries_of_live_processes_and_other_files_are_kept(tmp_path):
    live = tmp_path / f".checkpoint_0.pth.{os.getpid()}.0123abcd.tmp"
    dead = tmp_path / f".checkpoint_0.pth.{dead_pid()}.0123abcd.tmp"
    dead_dir = tmp_path / f".export.{dead_pid()}.89abcdef.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (live, dead, other):
        p.write_text("x")
    dead_dir.mkdir()
    (dead_dir / "config.yaml").write_text("x")
    assert ck.remove_stale_temporaries(tmp_path) == sorted([dead, dead_dir])
    assert live.exists() and other.exists() and not dead.exists() and not dead_dir.exists()


# ------------------------------------------------------------------------------ 12: non-finite state
def test_no_checkpoint_is_written_or_rotated_during_a_nonfinite_streak(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_epoch=2, iters_per_epoch=2, keep_last_checkpoints=1)
    runner = make_runner(cfg, task=NaNTask(cfg, lambda i: i == 3))  # the last iteration of epoch 1
    with caplog.at_level(logging.WARNING):
        summary = runner.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_0.pth"]
    assert summary["skipped_saves"] == 1
    resume = ck.load_file(tmp_path / RESUME_NAME)
    assert (resume["epoch"], resume["iteration"]) == (0, 2)  # the good state of the end of epoch 0
    assert "non-finite loss(es) in a row" in caplog.text and "checkpoint_1.pth NOT saved" in caplog.text


def test_no_checkpoint_is_written_with_nonfinite_weights(tmp_path, caplog):
    cfg = tiny_config(tmp_path, max_epoch=2, iters_per_epoch=2, keep_last_checkpoints=1)
    runner = make_runner(cfg)
    step = runner.optimizer.step
    name, param = next((n, p) for n, p in runner.model.named_parameters() if p.requires_grad)

    def blowing_up_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if runner.optimizer_steps == 3:  # the last update of the run
            with torch.no_grad():
                param.fill_(float("inf"))
        return out

    runner.optimizer.step = blowing_up_step
    with caplog.at_level(logging.WARNING):
        summary = runner.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_0.pth"]
    assert summary["skipped_saves"] == 1
    assert torch.isfinite(ck.load_file(tmp_path / "checkpoint_0.pth")["model"][name]).all()
    assert f"non-finite values in 1 trained weight(s) (first: {name})" in caplog.text


# ------------------------------------------------------------------------------ 10: storage errors
@needs_dev_full
def test_full_disk_during_a_checkpoint_save_is_a_storage_error(tmp_path, full_disk):
    target = tmp_path / "checkpoint_0.pth"
    with pytest.raises(StorageError) as info:
        ck.save_atomic({"model": {"w": torch.ones(1000)}}, target)
    assert str(info.value).startswith(f"{target}: cannot write: no space left on device")
    assert info.value.cause == "no space left on device" and not target.exists() and temp_names(tmp_path) == []


def test_read_only_disk_and_wordless_torch_errors_are_storage_errors(tmp_path, monkeypatch):
    read_only(monkeypatch, ck)
    with pytest.raises(StorageError, match=r"model\.pth: cannot write: read-only file system; nothing"):
        ck.save_atomic({"w": torch.ones(3)}, tmp_path / "model.pth")
    monkeypatch.undo()
    # torch's zip writer, given a path (DeepSpeed does that), says only "unexpected pos": the
    # cause is then read off the device
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result(
        (full.f_bsize, full.f_frsize, full.f_blocks, 0, 0, full.f_files, 0, 0, 0, full.f_namemax)))
    with pytest.raises(StorageError, match=r"model\.pth: cannot write: no space left on device \(0\.0 MiB free\)"):
        ck.save_atomic({"w": torch.ones(3)}, tmp_path / "model.pth")
    assert temp_names(tmp_path) == []


@needs_dev_full
def test_train_py_reports_a_full_disk_in_one_line_and_exits_1(tmp_path, full_disk, capsys, caplog):
    import train

    argv = ["--cfg-path", str(REPO / "train_configs/tiny_synthetic.yaml"), "--options", f"run.output_dir={tmp_path}",
            "run.max_epoch=1", "run.iters_per_epoch=1", "run.batch_size_train=2", "run.num_workers=0",
            "run.evaluate=false", "datasets.synthetic_clips.build_info.val_anno_dir=null"]
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"StorageError: {tmp_path / 'checkpoint_0.pth'}: cannot write: no space left on device; "
                      "nothing there was replaced (the checkpoints written before are intact: make room, then "
                      "rerun with run.auto_resume=true)"]
    assert temp_names(tmp_path) == [] and not list(tmp_path.glob("*.pth"))


def test_train_py_reports_other_full_disk_writes_in_one_line(tmp_path, monkeypatch, caplog):
    """The metrics log (not an atomic save) on a full disk: the OSError is named, not a traceback."""
    import train
    from videollm.runners.metrics import MetricsWriter

    log = tmp_path / "log.jsonl"

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log))

    monkeypatch.setattr(MetricsWriter, "write", full)
    argv = ["--cfg-path", str(REPO / "train_configs/tiny_synthetic.yaml"), "--options", f"run.output_dir={tmp_path}",
            "run.max_epoch=1", "run.iters_per_epoch=1", "run.batch_size_train=2", "run.num_workers=0",
            "run.log_freq=1", "run.evaluate=false", "datasets.synthetic_clips.build_info.val_anno_dir=null"]
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"StorageError: {log}: cannot read or write: no space left on device (")


def test_convert_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    import safetensors.torch

    src = tmp_path / "in.pth"
    torch.save({"model": {"w": torch.ones(4)}, "epoch": 0}, src)

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert convert.main(["to-safetensors", str(src), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: StorageError: {tmp_path / 'out.safetensors'}: cannot write: no space left on device; "
                   "nothing there was replaced"]
    read_only(monkeypatch, ck)
    assert convert.main(["to-pth", str(src), str(tmp_path / "out.pth")]) == 1
    assert "cannot write: read-only file system" in capsys.readouterr().err
    assert temp_names(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


# ------------------------------------------------------------------------------ 9: atomic folders
@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    _save_model(root / "base", BASE_VOCAB, seed=0)
    _save_model(root / "delta", DELTA_VOCAB, seed=1)
    return root


@needs_dev_full
def test_apply_delta_on_a_full_disk_leaves_nothing_and_a_retry_works(llamas, tmp_path, monkeypatch, capsys):
    import apply_delta

    target = tmp_path / "vicuna"
    opened = []
    real_open = delta._open_output

    def third_shard_on_full_disk(path):
        opened.append(path)
        return open(DEV_FULL, "wb") if len(opened) == 3 else real_open(path)

    monkeypatch.setattr(delta, "_open_output", third_shard_on_full_disk)
    args = ["--base", str(llamas / "base"), "--delta", str(llamas / "delta"), "--target", str(target),
            "--max-shard-size", "4KB"]
    assert apply_delta.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"StorageError: {target}: cannot write: no space left on device")
    assert len(opened) == 3 and not target.exists() and list(tmp_path.iterdir()) == []

    read_only(monkeypatch, delta)
    monkeypatch.setattr(delta, "_open_output", real_open)
    with pytest.raises(StorageError, match="read-only file system"):
        delta.apply_delta(llamas / "base", target, llamas / "delta", max_shard_size=4000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a killed attempt's temporary folder is cleared by the retry, which succeeds
    killed = tmp_path / f".vicuna.{dead_pid()}.0123abcd.tmp"
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    assert apply_delta.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vicuna"]
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert all((target / name).is_file() for name in set(index["weight_map"].values()))


def _export_cfg(tmp_path: Path, seed_note: str) -> Path:
    cfg = tmp_path / f"eval_{seed_note}.yaml"
    cfg.write_text("model:\n  arch: video_llama\n  model_type: tiny\n  max_txt_len: 16\n")
    return cfg


@needs_dev_full
def test_export_overwrite_keeps_the_old_export_until_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "export"
    torch.manual_seed(0)
    convert.export_folder(_export_cfg(tmp_path, "a"), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real = ck._temp_sibling

    def adapter_on_full_disk(path: Path) -> Path:  # the last big file of the export fails
        tmp = real(path)
        if path.name == "adapter.safetensors":
            os.symlink(DEV_FULL, tmp)
        return tmp

    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def save_file_via_python(tensors, filename, metadata=None):  # safetensors' own writer would replace the symlink
        with open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))

    monkeypatch.setattr(ck, "_temp_sibling", adapter_on_full_disk)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file_via_python)
    with pytest.raises(StorageError) as info:
        convert.export_folder(_export_cfg(tmp_path, "b"), out, overwrite=True)
    assert str(info.value).startswith(f"{out}: cannot write: no space left on device (at ")
    assert DEV_FULL.is_char_device()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the earlier export, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_a.yaml", "eval_b.yaml", "export"]

    monkeypatch.setattr(ck, "_temp_sibling", real)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    torch.manual_seed(1)
    convert.export_folder(_export_cfg(tmp_path, "b"), out, overwrite=True)
    assert (out / "adapter.safetensors").read_bytes() != before[Path("adapter.safetensors")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_a.yaml", "eval_b.yaml", "export"]
