"""Price catalogues: shipped data with provenance, lookups, and price files with good errors."""

import json

import pytest

from cloudexit.core.errors import UsageError
from cloudexit.plan.pricing import catalogue_text, known_providers, load_catalogue

PROVIDERS = ["aliyun-oss", "aws-s3", "azure-blob", "gcs", "huawei-obs", "tencent-cos"]


def test_every_provider_ships_and_every_figure_has_provenance():
    assert known_providers() == PROVIDERS
    for provider in PROVIDERS:
        catalogue = load_catalogue(provider)
        assert catalogue.facts, provider
        for fact in catalogue.facts:
            assert fact.source and fact.read_on, fact.name
            assert isinstance(fact.verified, bool), fact.name
            # An unknown number can never pass as verified.
            assert fact.known or not fact.verified, fact.name


def test_aws_egress_tiers_and_free_allowance():
    catalogue = load_catalogue("aws-s3")
    tiers = [(t.up_to_gb, t.price.value) for t in catalogue.egress.tiers]
    assert tiers == [(10240, 0.09), (51200, 0.085), (153600, 0.07), (None, 0.05)]
    assert catalogue.egress.free_gb_per_month.value == 100
    assert catalogue.currency == "USD"


def test_research_unverified_prices_ship_as_unverified():
    aws = load_catalogue("aws-s3")
    assert aws.get_per_1000.value == 0.0004 and aws.get_per_1000.verified is False
    tencent = load_catalogue("tencent-cos")
    assert tencent.egress.tiers[0].price.value == 0.50
    assert tencent.egress.tiers[0].price.verified is False
    oss = load_catalogue("aliyun-oss")
    assert oss.get_per_1000.verified is False and oss.list_per_1000.verified is False
    assert "requests.get_per_1000" in [f.name for f in oss.unverified()]


def test_alibaba_request_prices_are_recorded_with_their_source():
    """0.01 CNY per 10,000 Standard GET-type requests; OSS bills a LIST as a PUT-type request,
    also 0.01 CNY per 10,000 (docs/pricing.md). Before, both were unknown and every Alibaba
    plan said "incomplete"."""
    oss = load_catalogue("aliyun-oss")
    assert oss.get_per_1000.value == pytest.approx(0.01 / 10)
    assert oss.list_per_1000.value == pytest.approx(0.01 / 10)
    for fact in (oss.get_per_1000, oss.list_per_1000):
        assert "alibabacloud.com/help/en/oss/api-operation-calling-fees" in fact.source
        assert fact.read_on == "2026-12" and "free quota" in fact.note
    assert "PUT-type" in oss.list_per_1000.note


def test_alibaba_idle_hours_are_half_price():
    oss = load_catalogue("aliyun-oss")
    assert oss.egress.tiers[0].price.value == 0.50
    assert oss.billing_timezone == "Asia/Shanghai"
    assert oss.band_at(3 * 60).price.value == 0.25
    assert oss.band_at(8 * 60) is None
    assert oss.band_at(23 * 60 + 59) is None


def test_unknown_provider_lists_the_known_ones():
    with pytest.raises(UsageError) as caught:
        load_catalogue("dropbox")
    message = str(caught.value)
    assert "unknown provider 'dropbox'" in message
    for provider in PROVIDERS:
        assert provider in message
    assert caught.value.exit_code == 2


def test_unknown_region_lists_the_known_ones():
    with pytest.raises(UsageError, match="known regions: us-east-1"):
        load_catalogue("aws-s3", region="eu-west-1")
    assert load_catalogue("aliyun-oss", region="oss-cn-shanghai").region == "cn-shanghai"
    assert load_catalogue("aws-s3").region == "us-east-1"


@pytest.mark.parametrize(
    "provider, name, tier",
    [
        ("aws-s3", "GLACIER", "archive"),
        ("aws-s3", "deep_archive", "deep_archive"),
        ("aws-s3", "STANDARD_IA", "infrequent"),
        ("aws-s3", "GLACIER_IR", "archive_instant"),
        ("aliyun-oss", "Archive", "archive"),
        ("aliyun-oss", "ColdArchive", "cold_archive"),
        ("aliyun-oss", "DeepColdArchive", "deep_archive"),
        ("tencent-cos", "ARCHIVE", "archive"),
        ("tencent-cos", "DEEP_ARCHIVE", "deep_archive"),
        ("huawei-obs", "COLD", "archive"),
        ("huawei-obs", "GLACIER", "archive"),  # OBS through its S3-compatible API
        ("huawei-obs", "DEEP_ARCHIVE", "deep_archive"),
        ("azure-blob", "Archive", "archive"),
        ("gcs", "ARCHIVE", "archive_instant"),  # readable at once, but with a retrieval fee
    ],
)
def test_storage_classes_map_across_providers(provider, name, tier):
    assert load_catalogue(provider).storage_class(name).tier == tier


def test_unknown_storage_class_lists_the_known_ones():
    with pytest.raises(UsageError, match="GLACIER_IR"):
        load_catalogue("aws-s3").storage_class("TAPE")


def test_restore_tier_choices():
    glacier = load_catalogue("aws-s3").storage_class("GLACIER").restore
    assert glacier.fastest().name == "Expedited"
    assert glacier.cheapest().name == "Bulk"
    assert glacier.default().name == "Standard"
    assert (glacier.tiers["Standard"].hours.min, glacier.tiers["Standard"].hours.max) == (3, 5)
    deep = load_catalogue("aws-s3").storage_class("DEEP_ARCHIVE").restore
    assert deep.fastest().name == "Standard"
    assert deep.cheapest().name == "Bulk"
    obs = load_catalogue("huawei-obs").storage_class("COLD").restore
    assert obs.restored_copy_days.value == 30


def test_exit_programs_where_providers_have_them():
    assert load_catalogue("aws-s3").exit_program.window_days.value == 60
    assert load_catalogue("azure-blob").exit_program.window_days.value == 60
    assert load_catalogue("gcs").exit_program is not None
    assert load_catalogue("aliyun-oss").exit_program is None


CONTRACT = """\
{
  "format": "cloudexit.prices/1",
  "provider": "aws-s3",
  "currency": "USD",
  "regions": ["us-east-1"],
  "gb_bytes": {"value": 1073741824, "source": "contract", "read_on": "2026-10-01", "verified": true},
  "egress": {
    "free_gb_per_month": {"value": 0, "source": "contract", "read_on": "2026-10-01", "verified": true},
    "tiers": [
      {"up_to_gb": null,
       "price_per_gb": {"value": 0.02, "source": "contract", "read_on": "2026-10-01", "verified": true}}
    ]
  },
  "requests": {
    "get_per_1000": {"value": 0.0004, "source": "contract", "read_on": "2026-10-01", "verified": true},
    "list_per_1000": {"value": 0.005, "source": "contract", "read_on": "2026-10-01", "verified": true}
  },
  "storage_classes": {"STANDARD": {"tier": "standard"}}
}
"""


def test_a_contract_price_file_replaces_the_catalogue(tmp_path):
    path = tmp_path / "contract.json"
    path.write_text(CONTRACT)
    catalogue = load_catalogue("aws-s3", price_file=path)
    assert catalogue.egress.tiers[0].price.value == 0.02
    assert catalogue.gb_bytes.value == 2**30
    assert catalogue.unverified() == []


def test_a_yaml_price_file_is_accepted(tmp_path):
    import yaml

    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(json.loads(CONTRACT)))
    assert load_catalogue(price_file=path).get_per_1000.value == 0.0004


def test_price_file_missing_field_names_the_field_and_line(tmp_path):
    lines = CONTRACT.splitlines()
    # Line 11 (1-based) holds the tier's price; drop its read_on.
    assert '"price_per_gb"' in lines[10]
    lines[10] = lines[10].replace(', "read_on": "2026-10-01"', "")
    path = tmp_path / "contract.json"
    path.write_text("\n".join(lines))
    with pytest.raises(UsageError) as caught:
        load_catalogue(price_file=path)
    message = str(caught.value)
    assert "line 11" in message
    assert "egress.tiers[0].price_per_gb.read_on" in message
    assert str(path) in message


def test_price_file_missing_top_level_field(tmp_path):
    path = tmp_path / "contract.json"
    path.write_text(CONTRACT.replace('  "currency": "USD",\n', ""))
    with pytest.raises(UsageError, match=r"line 1: missing field 'currency'"):
        load_catalogue(price_file=path)


def test_price_file_for_another_provider_is_refused(tmp_path):
    path = tmp_path / "contract.json"
    path.write_text(CONTRACT)
    with pytest.raises(UsageError, match="is for 'aws-s3', not 'gcs'"):
        load_catalogue("gcs", price_file=path)


def test_price_file_that_is_not_json_or_missing(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": ')
    with pytest.raises(UsageError, match="not valid JSON or YAML"):
        load_catalogue(price_file=path)
    with pytest.raises(UsageError, match="cannot read price file"):
        load_catalogue(price_file=tmp_path / "absent.json")


def test_shipped_files_are_valid_starting_points(tmp_path):
    path = tmp_path / "copy.json"
    path.write_text(catalogue_text("aliyun-oss"))
    assert load_catalogue(price_file=path).provider == "aliyun-oss"
