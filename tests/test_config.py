from __future__ import annotations

import pytest

from fedpeft.composition import from_flat, from_mapping, load_toml
from fedpeft.config import RunConfig, unflatten
from fedpeft.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_flower_flat_config():
    cfg = RunConfig()
    assert from_flat(cfg.to_flat()) == cfg


def test_toml_file_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny-llama"\n[peft]\nr = 4\ntarget_modules = ["q_proj", "v_proj"]\n'
                    '[federation]\nrounds = 2\n')
    cfg = load_toml(path, {"federation.num_sites": 3})
    assert (cfg.model.name, cfg.peft.r, cfg.federation.rounds, cfg.federation.num_sites) == ("tiny-llama", 4, 2, 3)
    assert cfg.peft.target_modules == ("q_proj", "v_proj")


def test_flower_alias_and_comma_separated_lists():
    cfg = from_flat({"num-server-rounds": 7, "peft.target_modules": "query, value"})
    assert cfg.federation.rounds == 7
    assert cfg.peft.target_modules == ("query", "value")


def test_int_is_accepted_where_a_float_is_expected():
    assert from_flat({"peft.alpha": 32}).peft.alpha == 32.0


BAD_INPUTS = [
    ({"peft": {"method": "ia3", "lora_mode": "ffa"}}, ["peft.lora_mode", "'ffa'", "peft.method = 'lora'"]),
    ({"peft": {"method": "ia3", "use_dora": True}}, ["peft.use_dora", "LoRA options"]),
    ({"peft": {"method": "ia3"}, "privacy": {"dp": True, "grad_sample_mode": "ghost"}},
     ["privacy.grad_sample_mode", "'ia3'", "ghost clipping", "'auto'"]),
    ({"peft": {"head": "personal"}}, ["peft.head", "'personal'", "'local'"]),
    ({"model": {"task": "causal-lm"}, "peft": {"head": "local"}}, ["peft.head", "model.task = 'classification'"]),
    ({"model": {"task": "causal-lm"}, "data": {"task_column": "task"}}, ["data.task_column", "classification"]),
    ({"peft": {"method": "adalora", "r": 8, "adalora_init_r": 4}}, ["peft.adalora_init_r", "at least", "peft.r (8)"]),
    ({"peft": {"method": "adalora", "adalora_warmup_rounds": 2, "adalora_final_rounds": 1},
      "federation": {"rounds": 3}}, ["peft.adalora_warmup_rounds", "2 + 1", "federation.rounds (3)"]),
    ({"peft": {"use_dora": True}, "privacy": {"dp": True}}, ["privacy.dp", "DoRA"]),
    ({"peft": {"method": "adapter"}}, ["peft.method", "'adapter'", "'ia3'"]),
    ({"model": {"nme": "minilm"}}, ["model.nme", "known keys"]),
    ({"modle": {"name": "minilm"}}, ["[modle]", "known sections"]),
    ({"peft": {"r": -1}}, ["peft.r", "-1", "positive"]),
    ({"peft": {"r": "8"}}, ["peft.r", "'8'", "expected int"]),
    ({"peft": {"r": 8.5}}, ["peft.r", "expected int"]),
    ({"train": {"learning_rate": 0}}, ["train.learning_rate", "positive"]),
    ({"model": {"task": "regression"}}, ["model.task", "regression", "classification"]),
    ({"federation": {"fraction_train": 1.5}}, ["federation.fraction_train", "(0, 1]"]),
    ({"federation": {"min_sites": 9, "num_sites": 3}}, ["federation.min_sites", "between 1 and"]),
    ({"federation": {"aggregation": "fedmedian"}}, ["federation.aggregation", "fedavg"]),
    ({"data": {"partitioner": "random"}}, ["data.partitioner", "dirichlet"]),
    ({"data": {"partitioner": "column"}}, ["data.partition_column"]),
    ({"data": {"eval_fraction": 1.0}}, ["data.eval_fraction"]),
    ({"peft": {"target_modules": [1, 2]}}, ["peft.target_modules", "list of strings"]),
    ({"run": {"name": "a/b"}}, ["run.name", "'/'"]),
    ({"model": {"num_labels": 1}}, ["model.num_labels", "at least 2"]),
    ({"train": {"batch_size": True}}, ["train.batch_size", "expected int"]),
    ({"federation": {"secure_aggregation": True, "num_sites": 1}}, ["federation.num_sites", "at least 2"]),
    ({"federation": {"secure_aggregation": True, "num_sites": 30}, "secagg": {"degree": 5}},
     ["[secagg]", "degree=5", "even degree"]),
    ({"federation": {"secure_aggregation": True}, "secagg": {"threshold": 2}}, ["threshold=2", "default_threshold"]),
    ({"secagg": {"bits": 16}}, ["secagg.bits", "32"]),
    ({"privacy": {"client_dp": "central"}}, ["federation.weighting", "uniform"]),
    ({"privacy": {"dp": True}, "federation": {"aggregation": "fedprox"}}, ["fedprox", "DP-SGD"]),
    ({"privacy": {"accountant": "gdp"}}, ["privacy.accountant", "prv"]),
]


@pytest.mark.parametrize(("nested", "fragments"), BAD_INPUTS, ids=[str(b[0]) for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(nested, fragments):
    with pytest.raises(ConfigError) as info:
        from_mapping(nested)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_flat_key_without_section_is_rejected():
    with pytest.raises(ConfigError, match="'rounds' has no section"):
        unflatten({"rounds": 3})


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_a_relative_data_source_in_a_file_is_read_beside_it_and_an_override_beside_the_shell(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "sites.csv").write_text("text,label\nhello,a\n")
    (folder / "run.toml").write_text('[data]\nsource = "data/sites.csv"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_toml(folder / "run.toml").data.source == str(folder / "data" / "sites.csv")
    assert load_toml(folder / "run.toml", {"data.source": "mine.csv"}).data.source == "mine.csv"
    (folder / "run.toml").write_text('[data]\nsource = "only-here.csv"\n')  # not beside the config: left as written
    assert load_toml(folder / "run.toml").data.source == "only-here.csv"


def test_the_column_partitioner_takes_its_number_of_sites_from_the_column(tmp_path):
    sites = ["clinic-b", "clinic-a", "clinic-c"] * 4
    rows = "".join(f"ticket {i},{'ab'[i % 2]},{site}\n" for i, site in enumerate(sites))
    (tmp_path / "rows.csv").write_text("text,label,hospital\n" + rows)
    body = '[data]\nsource = "rows.csv"\npartitioner = "column"\npartition_column = "hospital"\n'
    (tmp_path / "run.toml").write_text(body + "[federation]\nmin_sites = 2\n")
    cfg = load_toml(tmp_path / "run.toml")
    assert (cfg.federation.num_sites, cfg.federation.min_sites) == (3, 2)
    from fedpeft.data.sites import column_site_names

    assert column_site_names(cfg) == {"0": "clinic-a", "1": "clinic-b", "2": "clinic-c"}
    assert load_toml(tmp_path / "run.toml", {"federation.num_sites": 4}).federation.num_sites == 4, \
        "a number the user gives is kept (and the partitioner then names both numbers)"
