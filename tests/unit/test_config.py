"""The config tree: layering, round trips, TOML values, and the keys that name modalities."""

import pytest

from omnistream.common.errors import UserError
from omnistream.configs import load_config
from omnistream.configs import path as shipped_config
from omnistream.configs.load import parse_value
from omnistream.training.evaluate import _slug, first_number, matches

DEMO = shipped_config("demo")


def test_layering_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layers = 3\nd_model = 64\n[train]\nlr = 0.01\n")
    c = load_config(f, ["model.n_layers=5", 'tracking.experiment="x"', 'data.train_shards=["a", "b"]'])
    assert c.model.n_layers == 5 and c.model.d_model == 64 and c.train.lr == 0.01
    assert c.tracking.experiment == "x" and c.data.train_shards == ["a", "b"]
    assert c.train.steps == load_config().train.steps  # untouched keys keep defaults
    flat = c.flat()
    assert flat["model.n_layers"] == 5 and flat["modalities.image"] == {}


def test_saved_config_reloads_to_the_same_tree(tmp_path):
    c = load_config(DEMO, ["train.steps=7"])
    f = tmp_path / "resolved.toml"
    f.write_text(c.to_toml())
    assert load_config(f) == c


def test_values_parse_as_toml():
    assert parse_value("4") == 4 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["model.n_layers"])


def test_eval_tasks_and_quality_keys_are_checked_against_the_modalities(tmp_path):
    c = load_config(DEMO)
    assert set(c.eval.tasks) == {"image_to_text", "audio_to_text", "two_digits"}
    assert c.eval.tasks["image_to_text"].prompt == "image" and c.eval.tasks["image_to_text"].match == "number"
    with pytest.raises(UserError, match="eval.tasks.x.prompt"):
        load_config(None, ['eval.tasks.x.prompt="smell"', 'eval.tasks.x.label_field="y"'])
    with pytest.raises(UserError, match="eval.tasks.x.match"):
        load_config(None, ['eval.tasks.x.prompt="image"', 'eval.tasks.x.label_field="y"', 'eval.tasks.x.match="fuzzy"'])
    with pytest.raises(UserError, match="data.quality.text.min_charz"):
        load_config(None, ["data.quality.text.min_charz=3"])
    with pytest.raises(UserError, match="smell"):
        load_config(None, ["data.quality.smell.enabled=false"])
    assert load_config(None, ["data.quality.image.near_max_hamming=6"]).data.quality == {
        "image": {"near_max_hamming": 6}
    }


@pytest.mark.parametrize(
    "text,number",
    [
        ("the digit seven", 7),
        ("a picture of 3", 3),
        ("twenty one cats", 21),
        ("fifteen", 15),
        ("no number here", None),
        ("someone", None),
        ("it is 2.5 m", 2.5),
    ],
)
def test_number_match_reads_numerals_and_words(text, number):
    assert first_number(text) == number


def test_match_rules():
    assert matches("the digit seven", 7, "number") and not matches("the digit seven", 1, "number")
    assert matches("A Cat ", "a cat", "exact") and not matches("a cat sat", "a cat", "exact")
    assert matches("a cat sat", "cat", "contains") and not matches("a dog", "cat", "contains")
    assert not matches("seven", "not a number", "number")


def test_sample_names_keep_every_label():
    """A sample's name carries its label, the digit 0 included (it was named 'x', as if it had none)."""
    assert [_slug(v) for v in (0, 7, "a b/c", None, "")] == ["0", "7", "a-b-c", "x", "x"]


@pytest.mark.parametrize(
    "toml,sets,says",
    [
        # a value from the command line is blamed on the --set that wrote it, not on the file
        ("[train]\nsteps = 5\n", ["train.steps=abc"], "--set train.steps=abc: Input should be a valid integer"),
        # a value from the file: the file and its line
        (
            'name = "m"\n\n[train]\nsteps = "abc"\n',
            [],
            "config key train.steps in {f}, line 4: Input should be a valid integer",
        ),
        ("[model]\nn_layers = 2\n[modalities.image]\npatch = 5\n", [], "config key modalities.image in {f}, line 3: "),
        # a list where a string was given: the TOML form of a list
        ("", ["data.train_shards=data/x.tar"], """--set 'data.train_shards=["a"]'"""),
        # a typo: the closest key
        ("[train]\nstepz = 3\n", [], "config key train.stepz in {f}, line 2: no such key; did you mean train.steps?"),
        ("", ["model.n_layerz=3"], "--set model.n_layerz=3: no such key; did you mean model.n_layers?"),
    ],
)
def test_errors_say_where_the_value_came_from_and_what_to_write(tmp_path, toml, sets, says):
    f = tmp_path / "melody.toml"
    f.write_text(toml)
    with pytest.raises(UserError) as e:
        load_config(f, sets)
    assert says.format(f=f) in str(e.value), str(e.value)


def test_credentials_in_a_url_are_refused_at_load_naming_the_key():
    """A password or token inside a URL stayed in clear in the run's description, data/report.json, dead
    letters, every checkpoint's omnistream.json, the token cache's JSON and Ray Train's train_loop_config:
    the config is saved everywhere. So a URL with user information is refused where the config is loaded,
    naming the key, and the credentials come from the environment; nothing of the secret is echoed."""
    from omnistream.common.errors import UserError
    from omnistream.common.logs import redact
    from omnistream.configs import load_config

    for sets, key in (
        (['tracking.uri="https://alice:s3cret@mlflow.example.org/path"'], "tracking.uri"),
        (['data.train_shards=["a.tar", "s3://AKIDX:hunter2@bucket/x-{000..003}.tar"]'], "data.train_shards"),
        (['data.sources.web.shards=["https://ghp_t0k3n@host/x.tar"]'], "data.sources.web.shards"),
    ):
        with pytest.raises(UserError) as e:
            load_config(None, sets)
        msg = str(e.value)
        assert key in msg and "environment" in msg, msg
        assert not any(s in msg for s in ("s3cret", "alice", "AKIDX", "hunter2", "ghp_t0k3n")), msg
    assert load_config(None, ['tracking.uri="http://127.0.0.1:5000"']).tracking.uri == "http://127.0.0.1:5000"
    assert redact("at http://127.0.0.1:5000 and sqlite:///x.db") == "at http://127.0.0.1:5000 and sqlite:///x.db"
    assert redact("https://alice:s3cret@mlflow.example.org/path") == "https://***@mlflow.example.org/path"
