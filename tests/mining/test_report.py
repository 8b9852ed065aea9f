"""objret.mining.report: valid reports parse; every kind of problem gives one clear line naming the field."""

import copy
import json

import pytest

from objret.errors import ReportError
from objret.mining.report import (SCHEMA_PATH, FailureReport, check_box_in_frame, check_report_box, load_report,
                                  parse_report)

FRAME_ID = "0123456789abcdef" * 4
NOT_A_DATE_TIME = "is not a date-time (RFC 3339, e.g. 2024-05-01T12:00:00Z)"


def valid_report() -> dict:
    return {
        "report_id": "rep-2024.05_01",
        "detector": {"name": "yolov8n", "version": "2024.05"},
        "frame": {"uri": "s3://lake/cam1/clip.mp4", "frame_index": 120},
        "box": [100, 50.5, 40, 80],
        "class_name": "person",
        "failure_kind": "false_negative",
        "notes": "missed behind the pole",
        "created_at": "2024-05-01T12:00:00Z",
    }


def problems_of(data) -> list[str]:
    with pytest.raises(ReportError) as caught:
        parse_report(data)
    return caught.value.problems


def with_changes(**changes) -> dict:
    data = valid_report()
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


# --- valid reports -----------------------------------------------------------------------------------


def test_schema_file_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("/2020-12/schema")


def test_valid_report_parses():
    report = parse_report(valid_report())
    assert report == FailureReport(
        report_id="rep-2024.05_01",
        detector_name="yolov8n",
        detector_version="2024.05",
        frame_id=None,
        frame_uri="s3://lake/cam1/clip.mp4",
        frame_index=120,
        box=(100.0, 50.5, 40.0, 80.0),
        class_name="person",
        failure_kind="false_negative",
        notes="missed behind the pole",
        created_at="2024-05-01T12:00:00Z",
    )


def test_to_dict_round_trips():
    report = parse_report(valid_report())
    assert parse_report(report.to_dict()) == report
    by_id = parse_report(with_changes(frame={"frame_id": FRAME_ID}, notes=None, created_at=None))
    assert by_id.to_dict()["frame"] == {"frame_id": FRAME_ID}
    assert parse_report(by_id.to_dict()) == by_id


def test_frame_by_id_only_and_minimal_report():
    report = parse_report(with_changes(frame={"frame_id": FRAME_ID.upper()}, notes=None, created_at=None))
    assert report.frame_id == FRAME_ID  # normalised to lower case, as the lake writes them
    assert report.frame_uri is None and report.frame_index is None
    assert report.notes == "" and report.created_at is None


def test_frame_may_carry_both_id_and_uri():
    report = parse_report(with_changes(frame={"frame_id": FRAME_ID, "uri": "/data/a.jpg"}))
    assert (report.frame_id, report.frame_uri) == (FRAME_ID, "/data/a.jpg")


def test_a_misclassification_names_the_class_the_detector_gave():
    report = parse_report(with_changes(failure_kind="misclassification", class_name="bicycle",
                                       predicted_class="motorcycle"))
    assert (report.class_name, report.predicted_class) == ("bicycle", "motorcycle")
    assert parse_report(report.to_dict()) == report
    # A report written before predicted_class existed still reads.
    older = parse_report(with_changes(failure_kind="misclassification", class_name="bicycle"))
    assert older.predicted_class is None and "predicted_class" not in older.to_dict()


@pytest.mark.parametrize("kind, class_name, predicted, expected", [
    ("false_negative", "person", "car",
     "predicted_class: is only for a misclassification report (a missed object has none)"),
    ("false_positive", "person", "stroller",
     "predicted_class: is only for a misclassification report (a false positive's is class_name)"),
    ("misclassification", "bicycle", "bicycle",
     "predicted_class: 'bicycle' is class_name too: a misclassification names two classes"),
    ("misclassification", "bicycle", "",
     "predicted_class: must not be empty"),
])
def test_predicted_class_that_does_not_fit_the_kind_is_refused(kind, class_name, predicted, expected):
    problems = problems_of(with_changes(failure_kind=kind, class_name=class_name, predicted_class=predicted))
    assert problems == [expected]


# --- one problem, one message ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"box": [1, 2, -3, 4]}, "box[2]: -3 is not > 0"),
        ({"box": [1, 2, 3, 0]}, "box[3]: 0 is not > 0"),
        ({"box": [-1, 2, 3, 4]}, "box[0]: -1 is not >= 0"),
        ({"box": [1, "2", 3, 4]}, "box[1]: '2' is not a number"),
        ({"box": [1, 2, 3]}, "box: needs 4 numbers [x, y, w, h], got 3"),
        ({"box": "1,2,3,4"}, "box: '1,2,3,4' is not a list"),
        (
            {"failure_kind": "oops"},
            "failure_kind: 'oops' is not one of false_negative, false_positive, misclassification",
        ),
        ({"frame": {}}, "frame: needs frame_id or uri"),
        ({"frame": {"frame_index": 3}}, "frame: needs frame_id or uri"),
        ({"frame": {"frame_id": "abc"}}, "frame.frame_id: 'abc' is not a frame id (64 hexadecimal characters)"),
        ({"frame": {"uri": "a.mp4", "frame_index": -1}}, "frame.frame_index: -1 is not >= 0"),
        ({"frame": {"uri": "a.mp4", "frame_index": 1.5}}, "frame.frame_index: 1.5 is not an integer"),
        ({"frame": {"uri": "a.mp4", "camera": 2}}, "frame.camera: unknown field"),
        ({"class_name": ""}, "class_name: must not be empty"),
        ({"class_name": "x" * 101}, "class_name: 101 characters, at most 100 allowed"),
        ({"class_name": None}, "class_name: missing (required)"),
        ({"detector": {"name": "yolo"}}, "detector.version: missing (required)"),
        ({"notes": 5}, "notes: 5 is not a string"),
        ({"created_at": "yesterday"}, f"created_at: 'yesterday' {NOT_A_DATE_TIME}"),
        ({"created_at": "2024-05-01T12:00:00"}, f"created_at: '2024-05-01T12:00:00' {NOT_A_DATE_TIME}"),
        ({"extra": 1}, "extra: unknown field"),
    ],
)
def test_each_problem_gives_one_message_naming_the_field(changes, expected):
    assert problems_of(with_changes(**changes)) == [expected]


@pytest.mark.parametrize("report_id", ["", ".hidden", "../etc", "a/b", "a b", "x" * 129, "ok\n"])
def test_report_ids_unsafe_as_file_names_are_rejected(report_id):
    problems = problems_of(with_changes(report_id=report_id))
    assert len(problems) == 1 and problems[0].startswith("report_id: ")


def test_frame_index_needs_uri():
    problems = problems_of(with_changes(frame={"frame_id": FRAME_ID, "frame_index": 3}))
    assert problems == ["frame.frame_index: only allowed together with uri"]


def test_a_report_that_is_not_an_object():
    assert problems_of([1, 2]) == ["report: [1, 2] is not an object"]


def test_several_problems_give_several_messages_in_field_order():
    data = with_changes(box=[1, 2, -3, 4], failure_kind="oops", class_name=None, report_id=".x")
    assert problems_of(data) == [
        "box[2]: -3 is not > 0",
        "class_name: missing (required)",
        "failure_kind: 'oops' is not one of false_negative, false_positive, misclassification",
        "report_id: '.x' may hold only letters, digits, '.', '_' and '-', and must not start with '.'",
    ]


def test_error_message_lists_every_problem():
    with pytest.raises(ReportError) as caught:
        parse_report(with_changes(box=[1, 2, -3, 4], failure_kind="oops"))
    assert "box[2]: -3 is not > 0" in str(caught.value)
    assert "failure_kind: 'oops'" in str(caught.value)


# --- non-finite numbers and bad JSON -----------------------------------------------------------------


def test_nan_and_infinity_in_json_are_rejected_by_field():
    text = json.dumps(valid_report()).replace("[100, 50.5, 40, 80]", "[100, NaN, Infinity, 80]")
    with pytest.raises(ReportError) as caught:
        load_report(text)
    assert caught.value.problems == [
        "box[1]: NaN is not allowed (numbers must be finite)",
        "box[2]: Infinity is not allowed (numbers must be finite)",
    ]


def test_nan_from_python_data_is_rejected():
    assert problems_of(with_changes(box=[1, 2, float("nan"), 4])) == [
        "box[2]: nan is not allowed (numbers must be finite)"
    ]


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{\n  "report_id": "r1",\n  "box": [1, 2, 3 4]\n}\n')
    with pytest.raises(ReportError) as caught:
        load_report(path)
    assert caught.value.problems == ["report: not valid JSON: Expecting ',' delimiter at line 3 column 19"]


def test_load_report_from_file_and_text(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(valid_report(), indent=2))
    expected = parse_report(valid_report())
    assert load_report(path) == expected
    assert load_report(str(path)) == expected
    assert load_report(path.read_text()) == expected


def test_load_report_reports_schema_problems(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(with_changes(failure_kind="oops")))
    with pytest.raises(ReportError) as caught:
        load_report(path)
    assert caught.value.problems == [
        "failure_kind: 'oops' is not one of false_negative, false_positive, misclassification"
    ]


def test_parse_report_does_not_modify_its_input():
    data = valid_report()
    before = copy.deepcopy(data)
    parse_report(data)
    assert data == before


# --- box against the frame ---------------------------------------------------------------------------


def test_box_inside_the_frame_is_unchanged():
    assert check_box_in_frame((10, 20, 30, 40), 640, 480) == (10.0, 20.0, 30.0, 40.0)


def test_box_partly_outside_is_clipped():
    assert check_box_in_frame((600, 450, 100, 100), 640, 480) == (600.0, 450.0, 40.0, 30.0)
    assert check_box_in_frame((-10, -5, 30, 25), 640, 480) == (0.0, 0.0, 20.0, 20.0)


@pytest.mark.parametrize("box", [(700, 10, 30, 30), (10, 480, 30, 30), (-40, 10, 30, 30), (640, 0, 5, 5)])
def test_box_outside_the_frame_is_rejected(box):
    with pytest.raises(ReportError) as caught:
        check_box_in_frame(box, 640, 480)
    shown = ", ".join(f"{v:g}" for v in box)
    assert caught.value.problems == [f"box [{shown}] lies outside the 640x480 frame"]


# --- a report's box: inside its frame and large enough to match -------------------------------------------------


CELL = (9.6, 9.6)   # a stride-8 cell of a 768 px wide frame read at 640 px


def test_a_report_box_inside_or_within_rounding_of_the_edge_is_taken_clipped():
    assert check_report_box((10, 20, 30, 40), 768, 576, CELL) == (10.0, 20.0, 30.0, 40.0)
    assert check_report_box((740, 550, 29.5, 27.5), 768, 576, CELL) == (740.0, 550.0, 28.0, 26.0)
    assert check_report_box((-1.5, 0, 20, 20), 768, 576, CELL) == (0.0, 0.0, 18.5, 20.0)


@pytest.mark.parametrize("box", [(760, 570, 50, 50), (-10, 5, 30, 30), (100, 560, 20, 20), (800, 10, 5, 5)])
def test_a_report_box_leaving_its_frame_is_refused_naming_the_frame(box):
    with pytest.raises(ReportError) as caught:
        check_report_box(box, 768, 576, CELL)
    shown = ", ".join(f"{v:g}" for v in box)
    assert caught.value.problems == [f"box: [{shown}] leaves the 768x576 frame (x + width must be <= 768, "
                                     "y + height <= 576)"]


@pytest.mark.parametrize("box", [(300, 200, 1, 1), (300, 200, 9, 9), (300, 200, 40, 2)])
def test_a_report_box_under_one_cell_is_refused(box):
    with pytest.raises(ReportError, match=r"covers less than one 9.6x9.6 px cell .*768x576 frame: too small"):
        check_report_box(box, 768, 576, CELL)
    assert check_report_box((300, 200, 10, 10), 768, 576, CELL) == (300.0, 200.0, 10.0, 10.0)
