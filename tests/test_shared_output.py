"""A run on several machines refuses an output_dir they do not all see (distributed/shared_output.py)."""

from tuneforge.distributed.shared_output import check_same_file, mismatch


def test_same_view_everywhere_passes(tmp_path):
    assert mismatch([("a", "x"), ("a", "x"), ("b", "x")], tmp_path) is None


def test_a_machine_that_sees_another_file_or_none_is_named(tmp_path):
    message = mismatch([("node0", "run 1"), ("node0", "run 1"), ("node1", None), ("node2", "run 0"),
                        ("node1", None)], tmp_path)
    assert "node1, node2" in message and "node0" in message and str(tmp_path) in message


def test_one_process_checks_nothing(tmp_path):
    check_same_file(tmp_path / "missing")  # no process group: nothing to compare, no error
