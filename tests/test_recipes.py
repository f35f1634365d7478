"""Recipes: the official configs' values, one base with per-data-set changes, overrides and their checks, the
evaluation protocol, batch arithmetic, default output folders."""

import pytest

from offseg_hf.training.recipes import (
    PAPER_RECIPE,
    RECIPES,
    EvalProtocol,
    default_output_dir,
    default_recipe,
    eval_protocol,
    get_recipe,
    per_device_batch_size,
    resolve_settings,
)


def test_paper_recipes_hold_the_official_configs_values():
    ade = get_recipe("ade20k-160k")
    assert (ade["learning_rate"], ade["adam_beta1"], ade["adam_beta2"], ade["weight_decay"]) == (6e-5, 0.9, 0.999, 0.01)
    assert (ade["head_lr_mult"], ade["param_group_rule"]) == (10, "official")
    assert (ade["warmup_steps"], ade["warmup_start_factor"], ade["poly_power"]) == (1500, 1e-6, 1)
    assert (ade["max_train_steps"], ade["total_batch_size"], ade["crop_size"]) == (160_000, 16, (512, 512))
    assert (ade["resize_scale"], ade["ratio_range"], ade["cat_max_ratio"]) == ((2048, 512), (0.5, 2.0), 0.75)
    assert (ade["flip_prob"], ade["photometric"]) == (0.5, True)
    assert (ade["eval_steps"], ade["checkpointing_steps"]) == (16_000, 16_000)  # val_interval, checkpoint interval
    city = get_recipe("cityscapes-160k")
    assert (city["crop_size"], city["total_batch_size"], city["max_train_steps"]) == ((1024, 1024), 8, 160_000)
    assert (city["resize_scale"], city["eval_scale"]) == ((2048, 1024), (2048, 1024))
    coco = get_recipe("coco-stuff-80k")
    assert (coco["max_train_steps"], coco["eval_steps"], coco["total_batch_size"]) == (80_000, 8_000, 16)


def test_evaluation_protocols():
    # test_cfg of the official configs: slide 512/480 (ADE20K, COCO-Stuff), 1024/768 (Cityscapes); val batch 1.
    assert eval_protocol("ade20k-160k") == EvalProtocol((2048, 512), "slide", (512, 512), (480, 480), 1)
    assert eval_protocol("coco-stuff-80k") == EvalProtocol((2048, 512), "slide", (512, 512), (480, 480), 1)
    assert eval_protocol("cityscapes-160k") == EvalProtocol((2048, 1024), "slide", (1024, 1024), (768, 768), 1)
    demo = eval_protocol("demo")
    assert (demo.scale, demo.mode, demo.batch_size) == ((512, 128), "whole", 8)
    assert demo.inference_kwargs() == {"mode": "whole", "crop_size": (512, 512), "stride": (480, 480), "batch_size": 8}
    # From resolved settings too, overrides included.
    settings = resolve_settings({"eval_mode": "slide", "eval_crop_size": [64, 64], "eval_stride": [48, 48]}, "demo")
    assert eval_protocol(settings) == EvalProtocol((512, 128), "slide", (64, 64), (48, 48), 8)


def test_pascal_context_and_the_segnext_family_changes():
    # The SegNeXt Pascal Context 59 configs: scale 520, crop 480, 80k iterations, test windows 480 every 320.
    pascal = get_recipe("pascal-context-59-80k")
    assert (pascal["crop_size"], pascal["resize_scale"], pascal["max_train_steps"]) == ((480, 480), (520, 520), 80_000)
    assert eval_protocol("pascal-context-59-80k") == EvalProtocol((520, 520), "slide", (480, 480), (320, 320), 1)
    # SegNeXt's official configs test ADE20K and COCO-Stuff on whole images; Cityscapes and Pascal Context slide.
    assert eval_protocol("ade20k-160k", family="lightham").mode == "whole"
    assert eval_protocol("coco-stuff-80k", family="lightham").mode == "whole"
    assert eval_protocol("cityscapes-160k", family="lightham").mode == "slide"
    assert eval_protocol("ade20k-160k", family="offseg").mode == "slide"
    # The family follows the variant the settings name; a flag still wins.
    assert resolve_settings({"variant": "segnext-t-offset"}, "ade20k-160k")["eval_mode"] == "whole"
    assert resolve_settings({"variant": "offseg-t"}, "ade20k-160k")["eval_mode"] == "slide"
    overridden = resolve_settings({"variant": "segnext-t", "eval_mode": "slide"}, "ade20k-160k")
    assert overridden["eval_mode"] == "slide"
    assert resolve_settings({}, "ade20k-160k", family="lightham")["eval_mode"] == "whole"  # a saved model's family
    segnext = resolve_settings({"variant": "segnext-b-offset"}, "ade20k-160k")
    assert {k: v for k, v in segnext.items() if v != get_recipe("ade20k-160k")[k]} == {
        "variant": "segnext-b-offset",
        "eval_mode": "whole",
    }  # optimizer, schedule, batch, augmentation: the paper base's, as the SegNeXt configs set them


def test_mask2former_family_takes_its_official_optimizer_and_schedule():
    # mask2former_offset_learning_swin-t_8xb2-160k_ade20k-512x512: AdamW 1e-4, wd 0.05, backbone lr x0.1, clip 0.01,
    # poly 0.9 from step 0, evaluation and checkpoints every 5000 steps on whole images.
    settings = resolve_settings({"variant": "mask2former-swin-t-offset"}, "ade20k-160k")
    expected = {
        "learning_rate": 1e-4,
        "weight_decay": 0.05,
        "head_lr_mult": 1.0,
        "backbone_lr_mult": 0.1,
        "clip_grad_norm": 0.01,
        "warmup_steps": 0,
        "poly_power": 0.9,
        "eval_mode": "whole",
        "eval_steps": 5_000,
        "checkpointing_steps": 5_000,
        "resize_mode": "shortest_edge",
    }
    assert {key: settings[key] for key in expected} == expected
    assert (settings["max_train_steps"], settings["total_batch_size"], settings["crop_size"]) == (
        160_000,
        16,
        (512, 512),
    )
    # The other families keep the paper base: no backbone multiplier, no clipping.
    base = resolve_settings({"variant": "segnext-t-offset"}, "ade20k-160k")
    assert (base["backbone_lr_mult"], base["clip_grad_norm"], base["learning_rate"]) == (1.0, 0.0, 6e-5)
    with pytest.raises(ValueError, match="clip_grad_norm must not be negative"):
        resolve_settings({"clip_grad_norm": -1.0}, "ade20k-160k")


def test_saved_model_family_reads_the_config_alone(tmp_path):
    from offseg_hf import OffSegConfig
    from offseg_hf.training import saved_model_family

    OffSegConfig.from_variant("segnext-t-offset", num_labels=3).save_pretrained(tmp_path)
    assert saved_model_family(str(tmp_path)) == "lightham"

    OffSegConfig.from_variant("mask2former-swin-t", num_labels=3).save_pretrained(tmp_path / "m2f")
    assert saved_model_family(str(tmp_path / "m2f")) == "mask2former"
    assert saved_model_family(str(tmp_path / "missing")) is None


def test_every_recipe_is_the_paper_base_plus_its_own_changes():
    def changed(name):
        return {key for key, value in RECIPES[name].items() if value != PAPER_RECIPE[key]}

    assert set(RECIPES) == {"demo", "ade20k-160k", "cityscapes-160k", "coco-stuff-80k", "pascal-context-59-80k"}
    assert all(set(recipe) == set(PAPER_RECIPE) for recipe in RECIPES.values())
    assert changed("ade20k-160k") == set()
    assert changed("cityscapes-160k") == {
        "total_batch_size",
        "crop_size",
        "resize_scale",
        "eval_scale",
        "eval_crop_size",
        "eval_stride",
    }
    assert changed("coco-stuff-80k") == {"max_train_steps", "eval_steps", "checkpointing_steps"}
    assert changed("pascal-context-59-80k") == changed("coco-stuff-80k") | {
        "crop_size",
        "resize_scale",
        "eval_scale",
        "eval_crop_size",
        "eval_stride",
    }
    assert "param_group_rule" not in changed("demo") and "weight_decay" not in changed("demo")
    with pytest.raises(TypeError):
        RECIPES["demo"]["learning_rate"] = 1.0  # read-only: get_recipe gives a copy
    copy = get_recipe("demo")
    copy["learning_rate"] = 1.0
    assert RECIPES["demo"]["learning_rate"] == 1e-3


def test_overrides_and_their_checks():
    settings = resolve_settings({"learning_rate": 0.5, "crop_size": [64, 32], "max_train_steps": None}, "demo")
    assert settings["learning_rate"] == 0.5 and settings["crop_size"] == (64, 32)
    assert settings["max_train_steps"] == 500  # None: the recipe's value
    bad = [
        ({"eval_mode": "tiled"}, "eval_mode 'tiled' is not one of: slide, whole"),
        ({"param_group_rule": "mmseg"}, "param_group_rule 'mmseg' is not one of: official, all_norms"),
        ({"variant": "segformer-b0"}, "variant 'segformer-b0' is not one of: offseg-b"),
        ({"crop_size": (0, 32)}, "crop_size must be positive"),
        ({"max_train_steps": 0}, "max_train_steps must be positive"),
        ({"eval_steps": -1}, "eval_steps must not be negative"),
        ({"flip_prob": 1.5}, r"flip_prob must be in \[0, 1\]"),
        ({"ratio_range": (2.0, 0.5)}, "ratio_range needs 0 < MIN <= MAX"),
        ({"learning_rat": 1.0}, "Not recipe fields"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            resolve_settings(overrides, "ade20k-160k")
    with pytest.raises(ValueError, match="Unknown recipe 'ade20k'; known: demo, ade20k-160k"):
        get_recipe("ade20k")


def test_per_device_batch_size_and_default_output_dir():
    assert per_device_batch_size(16, 8, 1) == 2 and per_device_batch_size(16, 1, 8) == 2
    with pytest.raises(ValueError, match="not divisible by 3 processes x 1"):
        per_device_batch_size(16, 3, 1)
    assert (default_recipe(demo=True), default_recipe(demo=False)) == ("demo", "ade20k-160k")
    assert default_recipe(demo=False, source="pascal_context_root") == "pascal-context-59-80k"
    assert (
        default_recipe(demo=False, source="ade20k_root")
        == default_recipe(demo=False, source="train_dir")
        == "ade20k-160k"
    )
    assert default_output_dir("demo", "segformer-b0-offset") == "outputs/demo-segformer-b0-offset"
    assert default_output_dir("demo", "offseg-t") == "outputs/demo-offseg-t"
    assert default_output_dir("ade20k-160k", "someone/offseg-t-ade20k") == "outputs/ade20k-160k-offseg-t-ade20k"
    assert default_output_dir("demo", "outputs/demo-offseg-t/") == "outputs/demo-demo-offseg-t"
