"""Strict config loading: every bad input is a ConfigError naming the key, raised before any actor starts."""

import textwrap

import pytest

from passk_rl.config import Config, ConfigError, config_from_dict, dump_yaml, load_config

import glob


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the resolved YAML round-trips to the same tree
    import yaml

    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_overrides_apply_with_types():
    cfg = config_from_dict({}, ["run.steps=7", "learner.lr=3e-4", "generator.n=8", "eval.ks=[1,2,4]"])
    assert cfg.run.steps == 7 and cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.generator.n == 8 and cfg.eval.ks == [1, 2, 4]


@pytest.mark.parametrize(
    "data,overrides,needle",
    [
        ({"learner": {"lr_rate": 1e-3}}, [], "learner.lr_rate"),
        ({"bogus": {}}, [], "'bogus'"),
        ({}, ["generator.temprature=0.7"], "generator.temprature"),
        ({"learner": {"zero_stage": 4}}, [], "learner.zero_stage"),
        ({"learner": {"aggregation": "sum"}}, [], "seq_mean_token_sum"),
        ({"cluster": {"device": "tpu"}}, [], "allowed values"),
        ({"generator": {"n": "many"}}, [], "generator.n: expected an integer"),
        ({"generator": {"n": 0}}, [], "generator.n"),
        ({"algorithm": {"shaping": "passk_magic"}}, [], "algorithm.shaping"),
        ({"task": {"name": "nope"}}, [], "task.name"),
        ({"estimator": {"kind": "nope"}}, [], "estimator.kind"),
        ({"schedule": {"kind": "nope"}}, [], "schedule.kind"),
        ({"eval": {"n": 4, "ks": [1, 8]}}, [], "eval.ks"),
        ({"run": {"steps": True}}, [], "run.steps"),
        ({}, ["not_a_pair"], "dotted.key=value"),
    ],
)
def test_bad_config_names_the_key(data, overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_k_larger_than_n_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        generator: {n: 4}
        schedule: {kind: fixed, params: {k: 8}}
    """))
    with pytest.raises(ConfigError, match="schedule"):
        load_config(p)


def test_cpu_rejects_tensor_parallel():
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        config_from_dict({"generator": {"tensor_parallel_size": 2}})


def test_fixed_k_the_shaping_cannot_take_is_rejected():
    with pytest.raises(ConfigError, match=r"schedule\.params: .*pkpo_loo_minus_one.*k >= 2"):
        config_from_dict({"algorithm": {"shaping": "pkpo_loo_minus_one"},
                          "schedule": {"kind": "fixed", "params": {"k": 1}}})
    with pytest.raises(ConfigError, match=r"schedule\.params"):
        config_from_dict({"algorithm": {"shaping": "pkpo_loo"}, "generator": {"n": 8},
                          "schedule": {"kind": "fixed", "params": {"k": 8}}})


CFG = "configs/tiny_cpu.yaml"


def test_multi_k_pairing_is_a_config_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"algorithm.shaping='multi_k' and schedule.kind='fixed'"):
        load_config(CFG, ["algorithm.shaping=multi_k", "schedule.kind=fixed", "schedule.params={k: 4}"])
    with pytest.raises(ConfigError, match=r"algorithm.shaping='pkpo_loo_minus_one' and schedule.kind='multi_k'"):
        load_config(CFG, ["schedule.kind=multi_k", "schedule.params={weights: {1: 1, 8: 1}}"])
    for free in ("grpo", "rloo", "dr_grpo"):  # K-free: any schedule, K none
        assert load_config(CFG, [f"algorithm.shaping={free}", "schedule.kind=multi_k",
                                 "schedule.params={weights: {1: 1, 8: 1}}"]).algorithm.shaping == free
    cfg = load_config(CFG, ["algorithm.shaping=multi_k", "schedule.kind=multi_k",
                            "schedule.params={weights: {1: 1, 8: 1}}"])
    assert cfg.schedule.kind == "multi_k"


def test_trackers_are_checked():
    import importlib.util

    assert load_config(CFG).logging.trackers == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match="logging.trackers: 'csv' is not allowed"):
        load_config(CFG, ["logging.trackers=[jsonl, csv]"])
    with pytest.raises(ConfigError, match="'jsonl' is required"):
        load_config(CFG, ["logging.trackers=[tensorboard]"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            load_config(CFG, ["logging.trackers=[jsonl, wandb]"])


def test_sampling_the_learner_cannot_score_is_refused():
    with pytest.raises(ConfigError, match="generator.top_p=0.9"):
        load_config(CFG, ["generator.top_p=0.9"])
    assert load_config(CFG, ["generator.temperature=0.7"]).generator.temperature == 0.7
    for bad in ("learner.ppo_epochs=0", "learner.mini_batches=0", "learner.dual_clip=0.5", "sync.keep_last=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(CFG, [bad])
