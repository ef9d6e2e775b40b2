"""Generated documents match the code (run `triage-node docs generate` after a change)."""

from worker.docgen import generated_documents


def test_generated_documents_are_current():
    stale = [
        str(path)
        for path, text in generated_documents().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"out of date, run `triage-node docs generate`: {stale}"
