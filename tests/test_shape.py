"""The reading edition's targets (tools/shape.py): the core stays short, flat and free of lab
notes."""

from tools import shape


def test_the_core_keeps_the_reading_edition_targets():
    over = [(name, value, target) for name, value, target in shape.measures() if value > target]
    assert not over, (
        f"over target: {over}; cycles {shape.import_cycles()}; lab notes {shape.lab_notes()}"
    )


def test_the_measures_see_a_planted_import_cycle_and_lab_note(tmp_path, monkeypatch):
    """The instruments themselves: a tree with a -> b -> a and a comment reporting a speed-up is
    caught."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from a import x\n")
    (tmp_path / "tools" / "c.py").write_text("import a  # 1.3x faster than before\n")
    for name in shape.CORE + ("data.py", "runtime.py"):
        (tmp_path / name).write_text(
            "x = 1  # bench.py measures this 2x faster\n" if name == "vae.py" else ""
        )
    monkeypatch.setattr(shape, "ROOT", str(tmp_path))
    assert shape.import_cycles() == [["a", "b", "a"]]
    assert [(n, i) for n, i, _ in shape.lab_notes()] == [("vae.py", 1)]
