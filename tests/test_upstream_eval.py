"""`tune-clipfh eval` on the thesis's own checkpoints (upstream layout, built here from
random full-size weights: no download), and eval's refusals as one `error:` line."""

from __future__ import annotations

import pytest

from tune_clipfh.cli import main


@pytest.mark.parametrize("what", ["missing", "no best.pt"])
def test_eval_run_without_a_best_checkpoint_is_one_error_line(what, tmp_path, capsys):
    run = tmp_path / "run"
    if what == "no best.pt":
        run.mkdir()
        (run / "config.yaml").write_text("model: rn50\n")
    assert main(["eval", "--run", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    reason = "does not exist" if what == "missing" else "has no best checkpoint"
    assert captured.err.startswith(f"error: --run {run}: the folder {reason} (best.pt; ")
