"""ltdet.engine.checkpoint: atomic checkpoints, the last_checkpoint pointer, damaged and partial
files, a full disk, keep_checkpoints, the files' mode."""

import os

import pytest
import torch

from ltdet.engine.checkpoint import Checkpointer, load_checkpoint


def test_checkpoint_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path)
    assert ck.last() is None
    ck.save("model_0000002.pth", {"model": {"w": torch.arange(3.0)}, "iteration": 2})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        ck.save("model_0000004.pth", {"model": {"w": torch.zeros(3)}, "iteration": 4})
    monkeypatch.undo()
    assert ck.last() == tmp_path / "model_0000002.pth"
    ckpt = load_checkpoint(ck.last())
    assert ckpt["iteration"] == 2 and torch.equal(ckpt["model"]["w"], torch.arange(3.0))
    # neither a partial final file nor a temporary file is left behind
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]


def test_checkpoint_pointer_and_damaged_file_errors(tmp_path):
    ck = Checkpointer(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileNotFoundError, match="model_0000009.pth, which does not exist"):
        ck.last()
    (tmp_path / "bad.pth").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="bad.pth.*damaged"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(tmp_path)

    def enospc(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OSError, match=r"no space left on device while writing .*model_0000001"):
        ck.save("model_0000001.pth", {"model": {}})

    def enforce_fail(obj, f, *args, **kwargs):  # torch's own report of a failed write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    import ltdet.fileio

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(ltdet.fileio, "_free_bytes", lambda folder: 1024)
    with pytest.raises(OSError, match=r"no space left on device while writing .*model_0000002"):
        ck.save("model_0000002.pth", {"model": {}})
    assert os.listdir(tmp_path) == []


def test_keep_checkpoints_never_deletes_a_protected_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=1)
    ck.save("model_0000001.pth", {"model": {}})
    ck.save("model_0000002.pth", {"model": {}}, protect=[tmp_path / "model_0000001.pth"])
    ck.save("model_0000003.pth", {"model": {}}, protect=[tmp_path / "model_0000001.pth"])
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]


def test_keep_checkpoints_keeps_the_newest_n(tiny_data, tmp_path, tiny_cfg):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "keep"
    cfg = tiny_cfg(tiny_data, out, "solver.checkpoint_period=1", "solver.keep_checkpoints=2")
    Trainer(cfg, evaluate=False, progress=False).train()
    names = sorted(p.name for p in (out / "checkpoints").glob("model_*.pth"))
    assert names == ["model_0000003.pth", "model_0000004.pth"]
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000004.pth"


def test_output_files_get_the_umask_mode(tiny_data, tmp_path, monkeypatch, tiny_cfg):
    import ltdet.fileio
    from ltdet.engine.trainer import Trainer

    monkeypatch.setattr(ltdet.fileio, "_UMASK", 0o027)  # the umask read at import
    out = tmp_path / "mode"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    for f in ("config.yaml", "checkpoints/model_0000001.pth", "checkpoints/last_checkpoint"):
        assert (out / f).stat().st_mode & 0o777 == 0o640, f  # not mkstemp's 0600
