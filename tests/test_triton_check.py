"""`triage-node triton check` on the shipped repository and on broken copies of it."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from triage_node.config import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY
from worker.inference.card import load_model_card
from worker.inference.triton_check import check_repository


@pytest.fixture()
def repo_copy(tmp_path):
    target = tmp_path / "models"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, target)
    return target


def test_shipped_repository_matches_its_card():
    report = check_repository(DEFAULT_MODEL_REPOSITORY, load_model_card(DEFAULT_MODEL_CARD))
    assert report.ok, report.problems
    assert sorted(report.models) == ["ich_sequence", "ich_slice_cnn"]


def test_renamed_folder_and_missing_model_are_reported(repo_copy):
    (repo_copy / "ich_sequence").rename(repo_copy / "ich_seq")
    (repo_copy / "ich_slice_cnn" / "1" / "model.onnx").unlink()
    problems = check_repository(repo_copy, load_model_card(DEFAULT_MODEL_CARD)).problems
    assert any("config name 'ich_sequence' differs from its folder" in p for p in problems)
    assert any("model.onnx missing" in p for p in problems)
    assert any("names 'ich_sequence', not in the repository" in p for p in problems)


def test_config_that_disagrees_with_onnx_and_card_is_reported(repo_copy):
    config = repo_copy / "ich_slice_cnn" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('name: "embedding"', 'name: "embeddings"'))
    problems = check_repository(repo_copy, load_model_card(DEFAULT_MODEL_CARD)).problems
    assert any("ONNX graph has no tensor 'embeddings'" in p for p in problems)
    assert any("ONNX tensors not in config: ['embedding']" in p for p in problems)


def test_unparseable_config_is_reported(repo_copy):
    (repo_copy / "ich_sequence" / "config.pbtxt").write_text("name: ich_sequence {{{")
    problems = check_repository(repo_copy, load_model_card(DEFAULT_MODEL_CARD)).problems
    assert any(p.startswith("ich_sequence: config.pbtxt:") for p in problems)


def test_cli_exit_codes(repo_copy):
    from triage_node.cli import build_app

    app = build_app()
    ok = CliRunner().invoke(app, ["triton", "check"])
    assert ok.exit_code == 0 and "ok:" in ok.output
    (repo_copy / "ich_slice_cnn" / "1" / "model.onnx").unlink()
    bad = CliRunner().invoke(app, ["triton", "check", "--repository", str(repo_copy)])
    assert bad.exit_code == 1 and "model.onnx missing" in bad.output
