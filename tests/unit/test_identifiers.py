"""The normaliser, value by value: emails, phones in several countries, opaque ids, junk."""

import pytest

from services.identity.identifiers import (
    InvalidIdentifier,
    ShopRules,
    normalize,
    salesforce_18,
)

RULES = ShopRules(country="GB", own_domains=frozenset({"myshop.example"}))


@pytest.mark.parametrize(
    ("raw", "value", "match_key"),
    [
        ("Sarah@Shopper.EXAMPLE", "sarah@shopper.example", "sarah@shopper.example"),
        ("  sarah@shopper.example\t", "sarah@shopper.example", "sarah@shopper.example"),
        ("Sarah.Smith+news@Gmail.com", "sarah.smith+news@gmail.com", "sarahsmith@gmail.com"),
        ("s.a.r.a.h@googlemail.com", "s.a.r.a.h@googlemail.com", "sarah@gmail.com"),
        ("first.last+tag@outlook.com", "first.last+tag@outlook.com", "first.last+tag@outlook.com"),
        (
            "Zoe\u0301@shopper.example",
            "zo\u00e9@shopper.example",
            "zo\u00e9@shopper.example",
        ),  # NFC
    ],
)
def test_emails_are_trimmed_nfc_lower_cased_with_a_gmail_match_key(
    raw: str, value: str, match_key: str
) -> None:
    found = normalize("email", raw, RULES)
    assert (found.raw, found.value, found.match_key, found.blocked) == (
        raw,
        value,
        match_key,
        False,
    )


@pytest.mark.parametrize("raw", ["not-an-address", "a@@b.example", "sarah@", "@example.com"])
def test_invalid_emails_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidIdentifier, match="not a valid email address"):
        normalize("email", raw, RULES)


@pytest.mark.parametrize(
    "raw",
    [
        "test@test.com",
        "someone@test.com",
        "orders@myshop.example",
        "anna@myshop.example",
        "Info@Retailer.example",
        "noreply@retailer.example",
        "support+ticket@retailer.example",
    ],
)
def test_junk_role_and_own_domain_emails_never_link(raw: str) -> None:
    assert normalize("email", raw, RULES).blocked is True


@pytest.mark.parametrize(
    ("raw", "country", "e164"),
    [
        ("07911 123456", "", "+447911123456"),  # the shop's country (GB)
        ("+44 7911 123456", "", "+447911123456"),
        ("0044 7911 123456", "", "+447911123456"),
        ("(415) 555-0123", "US", "+14155550123"),
        ("+1 415-555-0123", "FR", "+14155550123"),  # international form wins over the country
        ("01 42 68 53 00", "FR", "+33142685300"),
        ("030 1234567", "DE", "+49301234567"),
        ("0412 345 678", "AU", "+61412345678"),
        ("090-1234-5678", "JP", "+819012345678"),
    ],
)
def test_phones_become_e164_in_the_records_or_the_shops_country(
    raw: str, country: str, e164: str
) -> None:
    found = normalize("phone", raw, RULES, country)
    assert (found.value, found.match_key, found.blocked) == (e164, e164, False)


@pytest.mark.parametrize(
    ("raw", "country"), [("12", "GB"), ("+44 12", ""), ("555-0123", "US"), ("0912 345", "FR")]
)
def test_invalid_phone_numbers_are_rejected(raw: str, country: str) -> None:
    with pytest.raises(InvalidIdentifier, match=r"not a (valid )?phone number"):
        normalize("phone", raw, ShopRules(), country)


def test_a_national_number_without_any_country_asks_for_one() -> None:
    with pytest.raises(InvalidIdentifier, match="give a country or use"):
        normalize("phone", "7911123", ShopRules())


@pytest.mark.parametrize("raw", ["0000000", "000-000-0000", "1111111", "1234567"])
def test_placeholder_phones_never_link(raw: str) -> None:
    assert normalize("phone", raw, RULES).blocked is True


def test_opaque_ids_are_never_lower_cased() -> None:
    found = normalize("external_id", " LoyaltyAB12 ", RULES)
    assert (found.value, found.match_key) == ("LoyaltyAB12", "LoyaltyAB12")
    assert normalize("cookie", "AbC", RULES).match_key == "AbC"
    assert normalize("shopify_customer_id", "7012345678901", RULES).value == "7012345678901"


def test_salesforce_15_character_ids_become_their_18_character_form() -> None:
    # Upper-case letters per 5-character chunk, as bits: 001A0 -> 8 (I), 00001 -> 0 (A),
    # AbCdE -> 1 + 4 + 16 = 21 (V).
    assert salesforce_18("001A000001AbCdE") == "001A000001AbCdEIAV"
    found = normalize("crm_id", "001A000001AbCdE", RULES)
    assert (found.value, found.match_key) == ("001A000001AbCdEIAV", "001A000001AbCdEIAV")
    assert normalize("crm_id", "001A000001AbCdEIAV", RULES).match_key == "001A000001AbCdEIAV"
    assert normalize("crm_id", "12345", RULES).value == "12345"  # HubSpot: untouched


@pytest.mark.parametrize(
    ("type_", "raw"),
    [("pos_customer_id", "0"), ("external_id", "NULL"), ("cookie", "undefined"),
     ("pos_customer_id", "guest"), ("amazon_buyer_id", "0000000")],
)  # fmt: skip
def test_placeholder_values_never_link(type_: str, raw: str) -> None:
    assert normalize(type_, raw, RULES).blocked is True


def test_a_shops_blocked_values_never_link() -> None:
    rules = ShopRules(blocked=frozenset({("pos_customer_id", "WALKIN-1")}))
    assert normalize("pos_customer_id", "WALKIN-1", rules).blocked is True
    assert normalize("pos_customer_id", "WALKIN-2", rules).blocked is False


@pytest.mark.parametrize(
    ("type_", "raw", "why"),
    [
        ("fax", "1", "unknown identifier type"),
        ("email", "", "must be 1-320 characters"),
        ("cookie", "x" * 257, "must be 1-256 characters"),
    ],
)
def test_unknown_types_and_bad_lengths_are_rejected(type_: str, raw: str, why: str) -> None:
    with pytest.raises(InvalidIdentifier, match=why):
        normalize(type_, raw, RULES)
