import pytest

from mlcseg_ray.core.config import Config, ConfigError


def test_defaults_match_design():
    c = Config()
    assert (c.k_dataset, c.num_categories, c.k_category, c.k_image, c.vote) == (3, 20, 3, 3, 2)
    assert c.backbone == "vit_small_patch8_224.dino" and c.max_side == 512 and c.consistency == "relative"
    assert (c.crf_iters, c.crf_gauss_sxy, c.crf_bilateral_sxy, c.crf_bilateral_srgb) == (10, 3, 67, 3)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("k_dataset: 4\nconsistency: majority\n")
    c = Config.load(f, ["k_dataset=5", "crf=false", "weights=/x.pth"])
    assert c.k_dataset == 5 and c.consistency == "majority" and c.crf is False and c.weights == "/x.pth"


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("k_datset: 4\n")
    with pytest.raises(ConfigError, match="k_datset"):
        Config.load(f)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        Config.load(None, ["nope=1"])


def test_bad_value_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"combine.*'vote'.*'intersection'"):
        Config.load(None, ["combine=sometimes"])
    with pytest.raises(ConfigError, match="k_image"):
        Config.load(None, ["k_image=1"])
    with pytest.raises(ConfigError, match="key=value"):
        Config.load(None, ["k_image"])


def test_saved_config_round_trips(tmp_path):
    c = Config.load(None, ["num_classes=7"])
    c.save(tmp_path / "config.yaml")
    assert Config.load(tmp_path / "config.yaml") == c


def test_a_run_folder_from_before_the_sampled_fits_still_loads(tmp_path):
    """config.yaml of runs before issue 14 names the sample kmeans_init_sample: read as kmeans_sample."""
    (tmp_path / "config.yaml").write_text("kmeans_init_sample: 5000\nk_image: 4\n")
    cfg = Config.load(tmp_path / "config.yaml")
    assert cfg.kmeans_sample == 5000 and cfg.k_image == 4 and "kmeans_init_sample" not in cfg.model_dump()


def test_paths_workers_read_are_absolute(tmp_path, monkeypatch):
    """A joined cluster's workers run in their own directory: the weights file and the run folder given relative
    to this one are anchored here (a bucket URI stays as it is)."""
    from mlcseg_ray.core.run_dir import RunDir

    monkeypatch.chdir(tmp_path)
    assert Config.load(None, ["weights=w/dino.pth"]).weights == str(tmp_path / "w" / "dino.pth")
    assert Config.load(None, ["weights=s3://b/dino.pth"]).weights == "s3://b/dino.pth"
    assert RunDir("a/run").root == tmp_path / "a" / "run"
    assert str(RunDir("s3://b/run").root) == "s3://b/run"
