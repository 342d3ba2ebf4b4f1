import json
import math
import re

import pytest
import torch

from deeplinear.runs import (
    Progress,
    Run,
    atomic_save,
    load_file,
    load_final,
    rng_state,
    set_rng_state,
)


def test_fresh_run_layout_and_refuses_overwrite(tmp_path):
    run = Run.open(tmp_path / "r", {"lr": 0.1})
    run.log({"step": 1, "loss": 2.0})
    run.checkpoint({"step": 1})
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"lr": 0.1}
    assert run.metrics() == [{"loss": 2.0, "step": 1}]
    with pytest.raises(FileExistsError, match="holds this run; continue it with --resume"):
        Run.open(tmp_path / "r", {"lr": 0.1})
    # a sweep into one directory: the message names what differs, and that only --out helps
    with pytest.raises(FileExistsError, match=re.escape(
            "other settings (lr (run: 0.1, now: 0.2)); pass another --out")):
        Run.open(tmp_path / "r", {"lr": 0.2})
    for damaged in ("{", "[1, 2]"):  # settings that do not parse, or are not a run's
        (tmp_path / "r" / "config.json").write_text(damaged)
        with pytest.raises(FileExistsError, match="already holds a run; use --resume or another"):
            Run.open(tmp_path / "r", {"lr": 0.2})
    (tmp_path / "r" / "config.json").unlink()  # none at all: the plain refusal too
    with pytest.raises(FileExistsError, match="already holds a run; use --resume or another"):
        Run.open(tmp_path / "r", {"lr": 0.2})


def test_a_config_with_tuples_compares_as_it_was_saved(tmp_path):
    """JSON keeps a tuple as a list: the same settings given as tuples are still the same run."""
    Run.open(tmp_path, {"sizes": (4, 8, 2)}).checkpoint({"step": 1})
    with pytest.raises(FileExistsError, match="already holds this run"):
        Run.open(tmp_path, {"sizes": (4, 8, 2)})
    assert Run.open(tmp_path, {"sizes": (4, 8, 2)}, resume=True).resumed_state["step"] == 1


def test_resume_truncates_metrics_after_checkpoint_and_checks_config(tmp_path):
    run = Run.open(tmp_path, {"lr": 0.1})
    for s in (1, 2, 3):
        run.log({"step": s})
        if s == 2:
            run.checkpoint({"step": s, "w": torch.ones(2)})
    resumed = Run.open(tmp_path, {"lr": 0.1}, resume=True)
    assert resumed.resumed_state["step"] == 2
    assert torch.equal(resumed.resumed_state["w"], torch.ones(2))
    assert [r["step"] for r in resumed.metrics()] == [1, 2]
    with pytest.raises(ValueError, match="lr"):
        Run.open(tmp_path, {"lr": 0.2}, resume=True)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "checkpoint.pt").write_bytes(b""), "checkpoint.pt: corrupt or not a"),
    (lambda d: (d / "checkpoint.pt").write_bytes(b"not a zip"), "checkpoint.pt: corrupt"),
    (lambda d: torch.save([1, 2], d / "checkpoint.pt"), "checkpoint.pt: not a deeplinear"),
    (lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
])
def test_resume_from_a_damaged_run_is_one_line_naming_the_file(tmp_path, damage, message):
    Run.open(tmp_path, {"lr": 0.1}).checkpoint({"step": 1})
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as e:
        Run.open(tmp_path, {"lr": 0.1}, resume=True)
    assert len(str(e.value).splitlines()) == 1 and "another --out" in str(e.value)


def test_resume_accepts_a_run_written_before_a_setting_existed(tmp_path):
    """A setting added since (absent from the saved config) resumes at its default only."""
    run = Run.open(tmp_path, {"trainer": {"lr": 0.1}, "seed": 0})
    run.checkpoint({"step": 1})
    defaults = {"trainer": {"lr": 0.5, "blocks": (), "rank": 1}}
    resumed = Run.open(tmp_path, {"trainer": {"lr": 0.1, "blocks": ()}, "seed": 0}, resume=True,
                       defaults=defaults)
    assert resumed.resumed_state["step"] == 1
    blocks = 'differs in trainer.blocks (run: [], now: ["w"]); '
    with pytest.raises(ValueError, match=re.escape(blocks)):
        Run.open(tmp_path, {"trainer": {"lr": 0.1, "blocks": ("w",)}, "seed": 0}, resume=True,
                 defaults=defaults)
    with pytest.raises(ValueError, match=r"differs in seed \(run: 0, now: 1\), "
                       r"trainer\.lr \(run: 0\.1, now: 0\.5\); "):
        Run.open(tmp_path, {"trainer": {"lr": 0.5}, "seed": 1}, resume=True, defaults=defaults)
    with pytest.raises(ValueError, match=r"differs in seed \(run: 0, now: not set\), "
                       r"trainer\.extra \(run: not set, now: 2\); "):
        Run.open(tmp_path, {"trainer": {"lr": 0.1, "extra": 2}}, resume=True, defaults=defaults)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Run.open(tmp_path, {}, resume=True)


def test_atomic_save_leaves_no_temp_file(tmp_path):
    atomic_save({"a": 1}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_rng_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    state = rng_state(g)
    a = torch.rand(3, generator=g), torch.rand(3)
    set_rng_state(state, g)
    b = torch.rand(3, generator=g), torch.rand(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_progress_prints_rate_and_eta(capsys):
    import sys

    clock = iter([100.0, 101.0, 103.0])  # first update after a slow first step, then 1 s, 2 s
    p = Progress(total=10, desc="es", every_s=0.0, stream=sys.stdout, clock=lambda: next(clock))
    p.update(5, loss=1.5)  # the first update: no rate yet
    out = capsys.readouterr().out
    assert out.startswith("es 5/10      ?/s eta     ? ") and "loss=1.5" in out
    p.update(6, loss=1.25, test_acc=float("nan"))  # no evaluation yet: not shown
    out = capsys.readouterr().out
    assert out.startswith("es 6/10   1.00/s eta     4s ") and "loss=1.25" in out
    assert "test_acc" not in out
    p.update(7)
    assert capsys.readouterr().out.startswith("es 7/10   0.67/s eta     4s")


@pytest.mark.parametrize(("seconds", "text"), [
    (4.4, "4s"), (59.4, "59s"), (59.6, "1m00s"), (725, "12m05s"), (3599, "59m59s"),
    (11220, "3h07m"), (1230849, "14d05h")])
def test_an_eta_reads_in_units_a_person_uses(seconds, text):
    from deeplinear.runs import duration

    assert duration(seconds) == text


def test_a_fresh_run_never_writes_over_files_it_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text('{"my": "precious settings"}')
    with pytest.raises(FileExistsError, match="another --out"):
        Run.open(tmp_path, {"lr": 0.1})
    assert (tmp_path / "config.json").read_text() == '{"my": "precious settings"}'


def test_the_same_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    Run.open(tmp_path, {"lr": 0.1}).log({"step": 1})  # killed before any checkpoint
    assert Run.open(tmp_path, {"lr": 0.1}).metrics() == []
    with pytest.raises(FileExistsError, match="other settings"):
        Run.open(tmp_path, {"lr": 0.2})


def test_resume_drops_a_last_metrics_line_cut_short(tmp_path):
    run = Run.open(tmp_path, {"lr": 0.1})
    run.log({"step": 1})
    run.checkpoint({"step": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')  # the process died while appending
    assert Run.open(tmp_path, {"lr": 0.1}, resume=True).metrics() == [{"step": 1}]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n'),
     "metrics.jsonl: line 2 is not a metrics row"),
    (lambda d: (d / "metrics.jsonl").write_text('{"loss": 1}\n{"step": 2}\n'),
     "metrics.jsonl: line 1 is not a metrics row"),
    (lambda d: (d / "metrics.jsonl").unlink(), "metrics.jsonl: missing"),
    (lambda d: (d / "metrics.jsonl").write_text(""),
     "metrics.jsonl: 0 rows up to step 1, but the checkpoint was written after 1, so the run's "
     "history was cut"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 1}\n'),
     r"metrics.jsonl: line 2 \(step 1\) does not follow step 1"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n'),
     "metrics.jsonl: 2 rows up to step 1, but the checkpoint was written after 1, so the run's "
     "history was added to"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: not a run's config"),
    (lambda d: (d / "config.json").write_text("{lr"), "config.json: not valid JSON"),
])
def test_resume_with_damaged_run_files_is_one_line_naming_the_file(tmp_path, damage, message):
    run = Run.open(tmp_path, {"lr": 0.1})
    run.log({"step": 1})
    run.checkpoint({"step": 1})
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        Run.open(tmp_path, {"lr": 0.1}, resume=True)
    assert len(str(e.value).splitlines()) == 1 and "another --out" in str(e.value)


def test_resume_counts_the_metrics_rows_the_checkpoint_saw(tmp_path):
    run = Run.open(tmp_path, {"lr": 0.1})
    for step in (1, 2, 3):
        run.log({"step": step})
    run.checkpoint({"step": 3})
    run.log({"step": 4})  # after the checkpoint: dropped on resume, not missed
    resumed = Run.open(tmp_path, {"lr": 0.1}, resume=True)
    assert resumed.rows == 3 and resumed.metrics() == [{"step": s} for s in (1, 2, 3)]
    resumed.log({"step": 4})
    resumed.checkpoint({"step": 4})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"3 rows up to step 4, but the checkpoint was written "
                                         r"after 4, so the run's history was cut"):
        Run.open(tmp_path, {"lr": 0.1}, resume=True)
    # a checkpoint from before the count was recorded resumes as it did
    atomic_save({"step": 4, "run_config": {"lr": 0.1}}, tmp_path / "checkpoint.pt")
    assert Run.open(tmp_path, {"lr": 0.1}, resume=True).rows == 3


def test_resume_restores_a_deleted_config_from_the_checkpoints_copy(tmp_path):
    config = {"lr": 0.1, "sizes": (2, 3)}
    Run.open(tmp_path, config).checkpoint({"step": 1})
    written = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config differs in lr"):  # still judged, not rewritten
        Run.open(tmp_path, {**config, "lr": 0.2}, resume=True)
    assert not (tmp_path / "config.json").exists()
    assert Run.open(tmp_path, config, resume=True).resumed_state["step"] == 1
    assert (tmp_path / "config.json").read_text() == written
    # a checkpoint without the copy (an earlier version's) cannot restore it
    (tmp_path / "config.json").unlink()
    atomic_save({"step": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"config.json: missing; restore it or start the run "
                                         r"again in another --out"):
        Run.open(tmp_path, config, resume=True)


def test_resume_refuses_a_checkpoint_copied_from_another_run(tmp_path):
    Run.open(tmp_path / "a", {"lr": 0.1}).checkpoint({"step": 1})
    Run.open(tmp_path / "b", {"lr": 0.2}).checkpoint({"step": 5})
    (tmp_path / "b" / "checkpoint.pt").replace(tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: written by another run") as e:
        Run.open(tmp_path / "a", {"lr": 0.1}, resume=True)
    assert len(str(e.value).splitlines()) == 1 and "another --out" in str(e.value)
    # a checkpoint of an earlier version (no run config; trainers saved their own "config")
    atomic_save({"step": 1, "config": {"sigma": 9}}, tmp_path / "a" / "checkpoint.pt")
    assert Run.open(tmp_path / "a", {"lr": 0.1}, resume=True).resumed_state["step"] == 1


def test_resumed_names_what_a_trainer_needs_and_the_checkpoint_lacks(tmp_path):
    run = Run.open(tmp_path, {"lr": 0.1})
    assert run.resumed("es") is None  # a fresh run has nothing to check
    run.checkpoint({"step": 1, "rng": 0})
    resumed = Run.open(tmp_path, {"lr": 0.1}, resume=True)
    assert resumed.resumed("rng")["step"] == 1
    with pytest.raises(ValueError, match=r"checkpoint.pt: no es, wall_s in it, so not this "
                                         r"trainer's checkpoint; start .* another --out"):
        resumed.resumed("es", "rng", "wall_s")


def test_a_save_that_dies_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("deeplinear.runs.torch.save", dies)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    assert torch.load(path)["step"] == 1


def test_load_final_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "final.pt"
    torch.save({"state_dict": {"weights.0": torch.tensor([1.0, math.nan])},
                "model": {"kind": "deeplinear", "sizes": [2, 2]}}, path)
    with pytest.raises(ValueError, match=r"non-finite weights in weights\.0; the run diverged"):
        load_final(path)


def test_a_damaged_zip_archive_is_named_in_one_short_sentence(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04garbage" * 10)  # a zip's signature, then nothing valid
    with pytest.raises(ValueError) as e:
        load_file(path, "checkpoint", "start again")
    assert str(e.value) == (f"{path}: corrupt or not a deeplinear checkpoint (PytorchStreamReader "
                            "failed reading zip archive: failed finding central directory); "
                            "start again")


def test_a_run_another_process_is_writing_is_refused_until_it_ends(tmp_path):
    """Two processes in one run directory would interleave their metrics and checkpoints."""
    import subprocess
    import sys

    d = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deeplinear.runs import Run; "
         f"r = Run.open({str(d)!r}, {{'lr': 0.1}}); r.checkpoint({{'step': 1}}); "
         "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        for resume in (True, False):
            with pytest.raises(FileExistsError, match=re.escape(
                    f"{d} is in use by another process (PID {holder.pid}); wait for it to "
                    "finish or stop it, or use another --out")):
                Run.open(d, {"lr": 0.1}, resume=resume)
    finally:
        holder.kill()
        holder.wait()
    run = Run.open(d, {"lr": 0.1}, resume=True)  # the lock died with its process
    assert run.resumed_state["step"] == 1
    assert Run.open(d, {"lr": 0.1}, resume=True).resumed_state["step"] == 1  # reentrant here
    run.save_final({"step": 1})  # a finished run is released for other processes
    other = subprocess.run(
        [sys.executable, "-c", "from deeplinear.runs import Run; "
         f"print(Run.open({str(d)!r}, {{'lr': 0.1}}, resume=True).resumed_state['step'])"],
        capture_output=True, text=True)
    assert other.stdout == "1\n", other.stderr


def test_a_bit_flipped_anywhere_in_the_zip_records_is_a_one_line_error_or_harmless(tmp_path):
    """Flips in the end-of-archive records made zipfile raise OSError [Errno 22], which escaped
    as "error: [Errno 22] Invalid argument" (found by flipping every byte of a final.pt)."""
    path = tmp_path / "final.pt"
    atomic_save({"state_dict": {"w": torch.arange(64.0)}}, path)
    raw = path.read_bytes()
    for i in range(max(0, len(raw) - 200), len(raw)):
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x10]) + raw[i + 1:])
        try:
            load_file(path, "final.pt", "retrain")
        except ValueError as e:
            assert str(e).startswith(f"{path}: corrupt or not a deeplinear final.pt (")
            assert "\n" not in str(e)


def test_a_torch_file_of_the_legacy_format_still_loads(tmp_path):
    """torch.load reads files saved without the zip container; the CRC check must not refuse
    them (they have no CRCs to check)."""
    path = tmp_path / "final.pt"
    torch.save({"step": 3, "w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert load_file(path, "final.pt", "")["step"] == 3


def test_a_failed_save_says_why_in_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """A full disk reaches torch.save as "[enforce fail at inline_container.cc:672] . unexpected
    pos 39744 vs 39632" (measured on a 140 KB tmpfs): the message must say what to do, the
    temporary file must go and the last good checkpoint stay."""
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 39744 vs "
                           "39632\nframe #0: ...")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        atomic_save({"step": 2}, path)
    assert re.fullmatch(
        rf"cannot write {re.escape(str(path))} \(\[enforce fail at inline_container.cc:672\] . "
        r"unexpected pos 39744 vs 39632; [0-9.]+ MiB free on its disk\): the previous one is "
        r"intact; free some space, then continue with --resume", str(e.value)), str(e.value)
    (tmp_path / "fresh").mkdir()
    with pytest.raises(OSError, match=r"free some space, then run the same command again$"):
        atomic_save({"step": 1}, tmp_path / "fresh" / "final.pt")  # nothing to --resume from

    def denied(obj, f):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(OSError, match=r"\(Permission denied; .*: the previous one is intact; "
                                      r"make it writable, then continue with --resume$"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_file(path, "checkpoint", "") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "fresh"]
    assert not any((tmp_path / "fresh").iterdir())  # no temporary file left


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()  # as root a read-only mode does not stop writes; this does
    with pytest.raises(OSError, match=re.escape(f"cannot write in {tmp_path}: Is a directory; "
                                                "pass a writable --out")):
        Run.open(tmp_path, {"lr": 0.1})


def test_a_refused_or_stopped_run_gives_its_lock_back(tmp_path):
    """A notebook whose command was refused, or whose run was stopped, goes on living: the run
    must be free for a terminal's --resume, and a refused --out keeps no lock file of ours."""
    import subprocess
    import sys

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": 1}')
    with pytest.raises(FileExistsError):
        Run.open(foreign, {"lr": 0.1})
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    d = tmp_path / "r"
    Run.open(d, {"lr": 0.1}).checkpoint({"step": 1})
    Run.open(d, {"lr": 0.1}, resume=True).close()

    def another_process_resumes() -> bool:
        other = subprocess.run(
            [sys.executable, "-c", "from deeplinear.runs import Run; "
             f"print(Run.open({str(d)!r}, {{'lr': 0.1}}, resume=True).resumed_state['step'])"],
            capture_output=True, text=True)
        return other.stdout == "1\n"

    with pytest.raises(ValueError, match="config differs"):
        Run.open(d, {"lr": 0.5}, resume=True)  # refused: the lock it took goes back
    assert another_process_resumes()
    run = Run.open(d, {"lr": 0.1}, resume=True)
    assert not another_process_resumes()
    run.close()  # stopped (the CLI and reproduce close a run they stop)
    assert another_process_resumes()
    with Run.open(d, {"lr": 0.1}, resume=True) as run:  # a run driven from Python
        assert not another_process_resumes()
    assert another_process_resumes()


@pytest.mark.parametrize("kind", ["deeplinear", "mlp", "softmax"])
def test_save_model_keeps_the_function_not_only_the_weights(tmp_path, kind):
    """A state_dict alone reloads into a net of default semantics and scale, another function;
    save_model's final.pt gives back the same model, which eval and load_model read."""
    from deeplinear.arithmetic import IEEE
    from deeplinear.nets import DeepLinear, build_model
    from deeplinear.runs import load_model, save_model

    model = build_model(kind, [3, 8, 2], scale_exp=120, semantics=IEEE, seed=1)
    path = save_model(model, tmp_path / "m" / "final.pt", data={"name": "spirals", "seed": 0})
    back = load_model(tmp_path / "m")
    assert type(back) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values(), strict=True))
    if kind == "deeplinear":
        assert (back.semantics, back.scale_exp) == (IEEE, 120)
        x = torch.rand(5, 3)
        assert torch.equal(back(x, mode="exact"), model(x, mode="exact"))
    assert load_final(path)["data"] == {"name": "spirals", "seed": 0}
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite weights in"):
        save_model(model, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(ValueError, match="not Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    if kind == "deeplinear":
        with pytest.raises(ValueError, match="rebuild it with the same regime"):
            save_model(DeepLinear([3, 4, 2], regime="absorption:9"), tmp_path / "r.pt")


def test_a_finished_run_whose_checkpoint_was_deleted_says_so(tmp_path):
    """Deleting checkpoint.pt to save space leaves a finished run: neither --resume ("drop
    --resume") nor a fresh start ("continue it with --resume") may send the user back and forth."""
    run = Run.open(tmp_path, {"lr": 0.1})
    run.checkpoint({"step": 1})
    run.save_final({"step": 1})
    (tmp_path / "checkpoint.pt").unlink()
    for resume in (True, False):
        with pytest.raises(OSError, match=r"holds a finished run \(final\.pt\) without its "
                                          r"checkpoint, so it cannot be continued: evaluate it "
                                          r"with deeplinear eval"):
            Run.open(tmp_path, {"lr": 0.1}, resume=resume)


def test_failing_to_write_final_pt_of_a_run_advises_resume(tmp_path, monkeypatch):
    import errno

    run = Run.open(tmp_path, {"lr": 0.1})
    run.checkpoint({"step": 1})

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"free some space, then continue with --resume \(the "
                                      r"run's checkpoint is intact\)$"):
        run.save_final({"step": 1})


def test_a_setup_error_is_not_replaced_by_a_failure_to_tidy_up(tmp_path, monkeypatch):
    """A directory made unwritable mid-run: the discard after the real error must not raise
    its own (it replaced the message with "[Errno 1] Operation not permitted: .../.lock")."""
    import pathlib

    run = Run.open(tmp_path / "r", {"lr": 0.1})

    def refused(self, missing_ok=False):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", refused)
    run.discard_if_unstarted()  # no exception
