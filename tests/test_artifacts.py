"""The records between stages (medssl.artifacts): versioned, checked on read, one line per problem."""

from __future__ import annotations

import json

import pytest

from helpers import downstream_metrics, robustness_record
from medssl.artifacts import (
    BenchResults,
    DatasetIndex,
    DownstreamMetrics,
    ModelCard,
    RecordError,
    RobustnessReport,
    read_downstream,
)
from medssl.models.backbone import create_backbone


def test_a_record_is_written_with_its_version_and_read_back(tmp_path):
    record = DownstreamMetrics.model_validate(downstream_metrics())
    record.write(tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["format"] == "medssl-metrics/1" == DownstreamMetrics.FORMAT
    assert DownstreamMetrics.read(tmp_path / "metrics.json") == record


def test_a_file_of_another_version_is_refused_naming_the_file_and_both_versions(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**downstream_metrics(), "format": "medssl-metrics/2"}))
    with pytest.raises(RecordError, match=r"metrics\.json is a medssl-metrics/2 record; this medssl reads "
                                          r"medssl-metrics/1"):
        DownstreamMetrics.read(path)
    with pytest.raises(RecordError, match="medssl-metrics/2"):
        read_downstream(tmp_path)


def test_a_file_written_before_the_version_field_reads_as_version_1(tmp_path):
    path = tmp_path / "robustness.json"
    path.write_text(json.dumps(robustness_record(sweeps={"gamma": [{"level": 0.5, "auc": 0.7, "drop": 0.1}]})))
    report = RobustnessReport.read(path)
    assert report.format == "medssl-robustness/1" and report.sweeps["gamma"][0].auc == 0.7


@pytest.mark.parametrize("text, problem", [
    ("{", "not JSON"), ("[1, 2]", "not a JSON object"),
    (json.dumps({**downstream_metrics(), "best_step": "six"}), "best_step: Input should be a valid integer"),
    (json.dumps({k: v for k, v in downstream_metrics().items() if k != "history"}), "history: Field required"),
    (json.dumps({**downstream_metrics(), "surprise": 1}), "surprise: Extra inputs are not permitted"),
])
def test_a_damaged_record_is_one_line_naming_the_file_and_the_field(tmp_path, text, problem):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(RecordError, match=problem) as error:
        DownstreamMetrics.read(tmp_path / "metrics.json")
    assert str(tmp_path / "metrics.json") in str(error.value) and "\n" not in str(error.value)


def test_every_record_kind_has_its_own_version():
    kinds = [DatasetIndex, ModelCard, DownstreamMetrics, RobustnessReport, BenchResults]
    assert len({k.FORMAT for k in kinds}) == len(kinds)
    assert DatasetIndex.FORMAT == "medssl-shards/1"  # the format datasets carried before the records existed


def test_backbones_by_family():
    model, dim = create_backbone("timm:resnet18")
    assert dim == 512 and type(model) is type(create_backbone("resnet18")[0])
    with pytest.raises(ValueError, match="unknown backbone family 'nope'"):
        create_backbone("nope:resnet18")
