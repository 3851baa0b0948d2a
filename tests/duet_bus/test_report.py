"""The report's files: what it does with rows it cannot put in one table."""

import pytest

from duet_bus.report import write_run


def test_rows_with_other_columns_than_the_first_are_refused_naming_the_session(tmp_path):
    first = {"session_id": "s1", "method": "base", "auc": 0.5}
    for other in ({"session_id": "s2", "method": "base"},  # a column missing
                  {"session_id": "s2", "method": "base", "auc": 0.5, "extra": 1},  # one more
                  {"session_id": "s2", "auc": 0.5, "method": "base"}):  # the same, in another order
        with pytest.raises(ValueError, match="session 's2': columns .* differ from the first row's"):
            write_run(tmp_path, {}, [first, other], [], {})
