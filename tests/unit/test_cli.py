from pathlib import Path

import pytest

from sidecar.cli import main


def test_a_missing_dataset_file_is_one_error_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--dataset", str(tmp_path), "--index", "absent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(tmp_path / "qrels" / "test.tsv") in err
    assert "Traceback" not in err
