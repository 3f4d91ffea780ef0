"""The readers table (pipelines/formats.py): every registered data format passes the kit, and the kit can
fail; an unknown format or one whose library is missing is said in one line."""

import pytest

from omnistream.common.errors import ConformanceError, UserError
from omnistream.pipelines import formats
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.plan import open_sources


@pytest.mark.parametrize("name", sorted(formats.READERS))
def test_every_registered_format_passes_the_kit(name, tmp_path):
    formats.check_reader(name, tmp_path)


class DropsTheLastRecord(formats.WebDataset):
    """A reader that loses a record without a word: what the kit is there to catch."""

    def read(self, shard, bounds):
        return iter(list(super().read(shard, bounds))[:-1])


class NeedsAMissingLibrary(formats.WebDataset):
    requires = {"omnistream_no_such_library": "nosuch"}


def test_the_kit_fails_a_reader_that_loses_a_record(tmp_path, monkeypatch):
    monkeypatch.setitem(formats.READERS, "lossy", DropsTheLastRecord)
    with pytest.raises(ConformanceError, match="data format 'lossy': keys"):
        formats.check_reader("lossy", tmp_path)


def test_a_format_whose_library_is_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(formats.READERS, "needy", NeedsAMissingLibrary)
    shard = formats.WebDataset().write_sample(tmp_path, formats.SAMPLE)
    cfg = DataConfig(train_shards=[shard], format="needy", bundle_dir=str(tmp_path / "b"))
    with pytest.raises(
        UserError,
        match=r"^data format 'needy' needs omnistream_no_such_library, which is not "
        r"installed: pip install 'omnistream\[nosuch\]'$",
    ):
        open_sources(cfg, "fp", 0)
    with pytest.raises(UserError, match=r"data format 'csv' is not one omnistream reads \(formats: .*webdataset"):
        open_sources(cfg.model_copy(update={"format": "csv"}), "fp", 0)


def test_a_config_naming_formats_round_trips_through_its_saved_toml(tmp_path):
    """Every run saves its config as TOML (config/resolved.toml): a source's format, set or left to
    data.format, is written and read back."""
    from omnistream.configs import RunConfig, load_config

    cfg = RunConfig.model_validate(
        {
            "data": {
                "format": "webdataset",
                "sources": {"a": {"shards": ["a.tar"]}, "b": {"shards": ["b.tar"], "format": "webdataset"}},
            }
        }
    )
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    back = load_config(tmp_path / "run.toml")
    assert back.data.sources["a"].format == "" and back.data.sources["b"].format == "webdataset"
    assert back.data.format == "webdataset"
