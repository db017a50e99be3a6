"""How `c360 import` reads customer rows."""

from cli.importing import customer_record


def test_custobar_csv_cells_left_empty_are_left_out_and_booleans_read() -> None:
    row = {"external_id": "12", "can_email": "true", "can_sms": "0", "city": "", "email": "a@b.c"}
    assert customer_record(row, from_csv=True) == {
        "external_id": "12",
        "can_email": True,
        "can_sms": False,
        "email": "a@b.c",
    }


def test_json_lines_keep_empty_strings_as_removals_and_ids_exact() -> None:
    record = {"external_id": 9007199254740993, "language": "", "COMPANY__level": 3}
    assert customer_record(record, from_csv=False) == {
        "external_id": "9007199254740993",
        "language": "",
        "COMPANY__level": 3,
    }


def test_klaviyo_columns_become_custobar_fields() -> None:
    row = {"Email": "a@b.c", "First Name": "Ann", "Email Marketing Consent": "SUBSCRIBED",
           "Phone Number": "", "Source": "popup"}  # fmt: skip
    assert customer_record(row, from_csv=True) == {
        "email": "a@b.c",
        "first_name": "Ann",
        "can_email": True,
    }
