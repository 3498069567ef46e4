"""ltdet.engine.run_dir: a finished output_dir is refused (--overwrite is explicit consent),
stale temporary files are removed, --resume-from into another run's folder."""

import pytest

from ltdet.config import schema_path


def test_fresh_run_into_a_finished_output_dir_is_refused(
    tiny_data, tmp_path, monkeypatch, load_tool, tiny_cfg, tiny_opts, train_steps
):
    import ltdet.engine.logger
    from ltdet.engine.trainer import OutputDirError, Trainer

    out = tmp_path / "done"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "events" not in p.name}
    with pytest.raises(
        OutputDirError,
        match=r"holds a previous run.*model_0000001\.pth.*"
        r"--resume.*another output_dir.*--overwrite",
    ):
        Trainer(cfg, evaluate=False, progress=False)
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    argv = [
        str(schema_path()),
        "--no-progress",
        "--no-eval",
        "--opts",
        *tiny_opts(tiny_data, out),
        "solver.max_iter=1",
        "solver.checkpoint_period=1",
    ]
    assert load_tool("train").main(argv) == 2
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "events" not in p.name}
    assert {p: v for p, v in after.items() if p.name != "log.txt"} == {
        p: v for p, v in before.items() if p.name != "log.txt"
    }
    # --overwrite: explicit consent; the old checkpoints and log are replaced
    assert load_tool("train").main(argv[:3] + ["--overwrite"] + argv[3:]) == 0
    assert [r["iter"] for r in train_steps(out / "log.jsonl")] == [1]


def test_stale_tmp_files_are_removed_at_start(tiny_data, tmp_path, tiny_cfg):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "stale"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    stale = out / "checkpoints" / ".model_0000002.pth.abc123.tmp"
    stale.write_bytes(b"x" * 1000)  # what a kill -9 during torch.save leaves
    other = out / "checkpoints" / "notes.tmp"  # not ours: left alone
    other.write_text("keep")
    Trainer(
        tiny_cfg(tiny_data, out, "solver.max_iter=2", "solver.checkpoint_period=1"),
        resume=True,
        evaluate=False,
        progress=False,
    ).train()
    assert not stale.exists() and other.exists()


def test_resume_from_a_checkpoint_of_another_run_respects_the_output_dir(
    tiny_data, tmp_path, tiny_cfg
):
    from ltdet.engine.trainer import OutputDirError, Trainer

    src, dst = tmp_path / "src", tmp_path / "dst"
    one = ("solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(tiny_cfg(tiny_data, src, *one), evaluate=False, progress=False).train()
    Trainer(tiny_cfg(tiny_data, dst, *one), evaluate=False, progress=False).train()
    ckpt = src / "checkpoints" / "model_0000001.pth"
    with pytest.raises(OutputDirError, match="holds a previous run"):
        Trainer(
            tiny_cfg(tiny_data, dst, "solver.max_iter=2"),
            resume_from=ckpt,
            evaluate=False,
            progress=False,
        )
    with pytest.raises(OutputDirError, match="give one of them"):
        Trainer(
            tiny_cfg(tiny_data, dst), resume=True, overwrite=True, evaluate=False, progress=False
        )
