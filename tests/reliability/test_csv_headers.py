"""Each CSV file is read by its own header, never by another file's column positions (issue #31, 2)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from recsys_pipeline.events import SourceHeaderError, read_source
from tests.conftest import csv_events_source, ingest_staged

WINDOW = (datetime(1997, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC))


def csv_source(make_config, folder):
    return make_config(**csv_events_source("two-headers", folder))


def test_files_whose_headers_order_the_columns_differently_are_each_read_by_their_own(
    tmp_path, spark, make_config
) -> None:
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "a.csv").write_text(
        "user,item,type,value,ts\nu1,i1,view,1,880000000\nu2,i2,click,1,880000100\n"
    )
    # The same kind of events, columns in another order and one column the mapping does not read.
    (folder / "b.csv").write_text(
        "item,user,ts,note,type,value\ni3,u3,880000200,x,view,1\ni1,u2,880000300,y,view,1\n"
    )
    (folder / "empty.csv").write_text("")
    config = csv_source(make_config, folder)
    result = ingest_staged(spark, config, WINDOW, datetime.now(UTC), tmp_path / "s")
    pairs = {(row.user_id, row.item_id, row.event_type) for row in result.events.collect()}
    assert pairs == {("u1", "i1", "view"), ("u2", "i2", "click"), ("u3", "i3", "view"), ("u2", "i1", "view")}
    assert result.metrics["events_read"] == 4 and result.metrics["events_quarantined"] == 0


def test_a_file_whose_header_lacks_a_mapped_column_is_refused_naming_it(tmp_path, spark, make_config) -> None:
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "a.csv").write_text("user,item,type,value,ts\nu1,i1,view,1,880000000\n")
    (folder / "b.csv").write_text("customer,item,type,value,ts\nu2,i1,view,1,880000000\n")
    config = csv_source(make_config, folder)
    with pytest.raises(
        SourceHeaderError, match=r"b\.csv has the header \['customer'.*without the column\(s\) \['user'\]"
    ):
        read_source(spark, config.source)
