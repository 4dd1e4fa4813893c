"""report.md and the plots from a results dict written out by hand."""

from jaxcollab import report

RESULTS = {
    "setting": "semi",
    "tasks": ["synthetic/round1", "synthetic/round2"],
    "old_knowledge": ["synthetic/old"],
    "strategies": {
        "seq_fft": {"R": [[0.0, 0.1], [0.9, None], [0.2, 1.0]], "old": [1.0, 0.5, 0.25], "new": [0.9, 1.0],
                    "recent": [None, 0.2], "op": [0.9, 0.6], "bwt": [None, -0.7], "seconds": 12.4},
        "avg_lora": {"R": [[0.0, 0.1], [0.8, None], [0.4, 0.3]], "old": [1.0, 0.75, 0.625], "new": [0.8, 0.3],
                     "recent": [None, 0.4], "op": [0.8, 0.35], "bwt": [None, -0.4], "seconds": 3.0},
    },
    "config": {},
}


def test_markdown_has_the_final_round_table_and_every_matrix():
    text = report.markdown(RESULTS)
    assert text.startswith("# Semi-collaborative setting: 2 rounds")
    # results without per-item scores or weight changes: no intervals, – for the change
    assert "| seq_fft | 1.000 | 0.200 | 0.250 | 0.600 | -0.700 | – | 12 |" in text
    assert "| avg_lora | 0.300 | 0.400 | 0.625 | 0.350 | -0.400 | – | 3 |" in text
    assert "| round 1 | 0.900 | – | 0.500 |" in text  # not evaluated above the diagonal
    assert text.count("### ") == 2
    assert "No comparison of the paper's findings is possible" in text  # seq_fft vs avg_lora: none applies
    assert "## The paper's findings on this run" in text


def test_write_report_makes_the_markdown_and_two_pngs(tmp_path):
    written = report.write_report(RESULTS, tmp_path)
    assert [p.name for p in written] == ["report.md", "knowledge.png", "R_matrices.png"]
    for path in written[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_seed_table_reports_each_run_and_the_spread():
    other = {**RESULTS, "config": {"seed": 1}, "strategies": {
        name: {**s, "op": [s["op"][0], s["op"][1] - 0.1]} for name, s in RESULTS["strategies"].items()}}
    rows = report.seed_table([{**RESULTS, "config": {"seed": 0}}, other], measures=("op",))
    assert rows[0] == "| strategy | OP (seed 0) | OP (seed 1) | OP spread |"
    assert rows[2] == "| seq_fft | 0.600 | 0.500 | 0.100 |"


def test_command_line_help_and_bad_files(tmp_path, capsys):
    assert report.main(["report", "--help"]) == 0 and "usage: python -m jaxcollab.report" in capsys.readouterr().out
    assert report.main(["report", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert report.main(["report", "--findings", str(tmp_path / "broken.json")]) == 1
    assert "broken.json: not JSON" in capsys.readouterr().err
    assert report.main(["report", "--bogus"]) == 2 and "usage:" in capsys.readouterr().err


def test_learning_table_judges_each_round_against_the_base_and_the_constant_answer():
    ones = lambda k: [1.0] * k + [0.0] * (10 - k)  # noqa: E731  (k of 10 items right, the first k)
    results = {**RESULTS, "tasks": ["FOMC", "NumGLUE-cm"],
               "constant_answer": [{"task": "FOMC", "answer": "C", "score": 0.5, "items": ones(5)},
                                   {"task": "NumGLUE-cm", "answer": "1", "score": 0.0, "items": ones(0)}]}
    results["strategies"] = {
        "seq_lora": {**RESULTS["strategies"]["seq_fft"], "R": [[0.0, 0.0], [0.8, None], [0.5, 0.9]],
                     "R_items": [[ones(0), ones(0)], [ones(8), None], [ones(5), ones(9)]]},
        "seq_fft": {**RESULTS["strategies"]["seq_fft"], "R": [[0.0, 0.0], [0.0, None], [0.0, 0.0]],
                    "R_items": [[ones(0), ones(0)], [ones(0), None], [ones(0), ones(0)]]},
    }
    rows = report.learning_table(results)
    # FOMC: 8 of 10 against the base's 0 (paired t: 0.8 +- 2.262 * 0.1333), against the constant answer's 5 of
    # the same 10 (differences: three 1s, seven 0s: 0.3 +- 2.262 * 0.1528, which includes 0).
    assert rows[2] == ("| seq_lora | 1 | FOMC | 0.800 | 0.800 [0.498, 1.102] | 0.300 [-0.046, 0.646] |"
                       " no better than always answering 'C' |")
    assert rows[3].startswith("| seq_lora | 2 | NumGLUE-cm | 0.900 | 0.900 [") and rows[3].endswith("| learned |")
    assert rows[4].endswith("| not above the base |") and rows[5].endswith("| not above the base |")
    text = report.markdown(results)
    assert "## Was each round's task learned?" in text and "FOMC: 'C' scores 0.500" in text
    assert report.learning_table(RESULTS) == []  # results without constant answers: no table
