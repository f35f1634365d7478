#!/usr/bin/env python
"""Build (and upload) one Hub repo per variant: SegFormer-offset B0..B5, OffSeg-T/B/L, SegNeXt-T/S/B (offset and
per-pixel) and Mask2Former Swin-T (offset and plain).

    # folders only, no network: saved models from converted/<variant>/, results from results/<variant>/
    python examples/push_to_hub.py --output_dir hub/ --weights_dir converted/ --results_dir results/
    # upload (network; `hf auth login` first, or --hub_token)
    python examples/push_to_hub.py --output_dir hub/ --weights_dir converted/ --results_dir results/ \\
        --push_to_hub --hub_namespace my-org

Each folder holds the weights as safetensors, config.json with `auto_map`, the modeling code (so
`trust_remote_code=True` loads it without offseg-hf), preprocessor_config.json, and a README.md rendered from
MODEL_CARD.md with Hub metadata (license, tags, datasets, pipeline_tag, widget images, and `model-index` only from
an eval_results.json that examples/evaluate_segmentation.py measured on those very weights).

Each folder also carries `handler.py` + `requirements.txt` for Inference Endpoints (Hub widgets do not run
custom-code models, so the cards say so and point to the endpoint handler, the ONNX file and the demo Space);
`--onnx` adds `onnx/model.onnx` (offseg_hf.onnx.export_onnx, dynamic batch/height/width). `--space_dir DIR` writes
a Gradio Space folder (README.md with Space metadata and `models:` listing the repos, app.py = examples/app.py,
app_config.json, requirements.txt, example images); with `--push_to_hub` it is uploaded as `--space_id`
(default <namespace>/offseg-demo), which the cards link.

    python examples/push_to_hub.py --output_dir hub/ --random_init --variants segformer-b0-offset --onnx \\
        --space_dir space/

`--random_init` builds untrained repos to try the pipeline: at full size that writes about 1.9 GB for all the
variants (SegFormer-B5-offset alone about 330 MB); pick some with `--variants`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel

from offseg_hf import OffSegImageProcessor
from offseg_hf.demo_data import generate_scene
from offseg_hf.hub import (
    check_measured_on,
    count_gmac,
    render_card,
    space_readme,
    space_requirements,
    write_endpoint_files,
)
from offseg_hf.presets import all_variant_names, config_for_variant, model_class_for, variant_family

RESULTS_FILE = "eval_results.json"  # what evaluate_segmentation.py writes into its --output_dir
APP = Path(__file__).resolve().parent / "app.py"  # the Gradio demo, the Space's app.py
DEFAULT_SPACE_NAME = "offseg-demo"
ONNX_FILE = "onnx/model.onnx"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Write one repo folder per variant here.")
    parser.add_argument(
        "--variants", nargs="+", default=None, metavar="VARIANT", help="Variants to build (default: all presets)."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights_dir",
        help="Folder with one saved model per variant, DIR/<variant>/ (python -m offseg_hf.convert --output_dir "
        "DIR/<variant>, or train.py --output_dir DIR/<variant>).",
    )
    source.add_argument(
        "--random_init",
        action="store_true",
        help="Fresh random weights, to test the repos (about 1.9 GB for all variants at full size).",
    )
    parser.add_argument(
        "--config_overrides",
        default=None,
        help='JSON {"segformer": {...}, "offseg": {...}, "lightham": {...}, "mask2former": {...}}: config values '
        "per family for --random_init models.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the --random_init weights.")
    parser.add_argument(
        "--results_dir",
        default=None,
        help=f"DIR/<variant>/{RESULTS_FILE} from evaluate_segmentation.py --output_dir DIR/<variant>, measured on "
        "the same weights (checked by fingerprint); variants without one get no results on their card.",
    )
    parser.add_argument(
        "--dataset_name",
        default="scene_parse_150",
        help="Hub id of the data set the weights were trained on (default: scene_parse_150, ADE20K; set it for "
        "weights trained on anything else, e.g. the demo set).",
    )
    parser.add_argument("--dataset_pretty_name", default="ADE20K", help="Its name as the card shows it.")
    parser.add_argument(
        "--card_template",
        default=str(Path(__file__).resolve().parents[1] / "MODEL_CARD.md"),
        help="Model card template with {placeholders}.",
    )
    extras = parser.add_argument_group("deployment extras")
    extras.add_argument(
        "--onnx",
        action="store_true",
        help=f"Also export each model to {ONNX_FILE} (offseg_hf.onnx.export_onnx, dynamic batch/height/width; needs "
        "offseg-hf's onnx extra). A variant the exporter cannot handle gets no ONNX file and a card that says so.",
    )
    extras.add_argument("--onnx_opset", type=int, default=20, help="ONNX opset of --onnx (default 20).")
    extras.add_argument(
        "--space_dir",
        default=None,
        help="Write a Gradio Space folder here (README.md with Space metadata, app.py, app_config.json, "
        "requirements.txt, example images) running the models built; uploaded with --push_to_hub.",
    )
    extras.add_argument(
        "--space_id",
        default=None,
        help=f"Repo id of the demo Space the cards link (default with --space_dir: <namespace>/{DEFAULT_SPACE_NAME}).",
    )
    hub = parser.add_argument_group("upload")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload each folder to <namespace>/<variant>.")
    hub.add_argument(
        "--hub_namespace",
        default=None,
        help="User or organisation of the repos (default: the logged-in user when pushing; the cards' repo ids "
        "read offseg-hf/<variant> otherwise).",
    )
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repos as private.")
    hub.add_argument("--hub_token", default=None, help="Hub token (else the logged-in one).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work; a bad one ends the script with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    known = all_variant_names()
    args.variants = args.variants or known
    unknown = [variant for variant in args.variants if variant not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(known)}.")
    if args.weights_dir is not None:
        missing = [variant for variant in args.variants if not (Path(args.weights_dir) / variant).is_dir()]
        if missing:
            parser.error(f"no saved model for {missing[0]!r}: {Path(args.weights_dir) / missing[0]} is not a folder.")
    try:
        overrides = json.loads(args.config_overrides or "{}")
    except json.JSONDecodeError as error:
        parser.error(f"--config_overrides is not JSON: {error}")
    families = {variant_family(variant) for variant in known}
    if not isinstance(overrides, dict) or not set(overrides) <= families:
        parser.error(f"--config_overrides must be a JSON object with keys among {sorted(families)}.")
    if overrides and not args.random_init:
        parser.error("--config_overrides applies to --random_init models.")
    args.config_overrides = overrides
    if args.results_dir is not None:
        if not Path(args.results_dir).is_dir():
            parser.error(f"--results_dir {args.results_dir} is not a folder.")
        for variant in args.variants:
            path = Path(args.results_dir) / variant / RESULTS_FILE
            if path.exists() and "weights_sha256" not in _read_json(path, parser):
                parser.error(f"{path} names no weights_sha256: write it with examples/evaluate_segmentation.py.")
    if not Path(args.card_template).is_file():
        parser.error(f"--card_template {args.card_template} is not a file.")
    if args.space_id is not None and args.space_id.count("/") != 1:
        parser.error(f"--space_id must be <namespace>/<name>; got {args.space_id!r}.")
    args.gradio_version = None
    if args.space_dir is not None:
        try:  # the Space runs the Gradio the demo is tested with
            args.gradio_version = metadata.version("gradio")
        except metadata.PackageNotFoundError:
            parser.error('--space_dir needs gradio installed (pip install -e ".[demo]"): the Space pins its version.')
    if args.onnx_opset < 7:
        parser.error(f"--onnx_opset must be at least 7; got {args.onnx_opset}.")
    if (args.hub_private_repo or args.hub_namespace is not None) and not args.push_to_hub:
        parser.error("--hub_namespace / --hub_private_repo apply with --push_to_hub.")
    return args


def _read_json(path: Path, parser: argparse.ArgumentParser) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        parser.error(f"{path} is not JSON: {error}")


def build_model(args, variant: str) -> tuple[PreTrainedModel, str]:
    config = config_for_variant(variant, **args.config_overrides.get(variant_family(variant), {}))
    if args.random_init:
        torch.manual_seed(args.seed)
        return model_class_for(config)(config).eval(), "random initialisation (for testing; not trained)"
    folder = Path(args.weights_dir) / variant
    return model_class_for(config).from_pretrained(folder).eval(), f"from `{folder.name}`"


def export_onnx_file(model: PreTrainedModel, folder: Path, opset: int) -> bool:
    """Write folder/onnx/model.onnx; False (and no file) where the exporter fails on this model."""
    from offseg_hf.onnx import export_onnx

    path = folder / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(model, path, opset=opset, dynamic=True)
    except ImportError:  # onnx / onnxruntime / onnxscript missing: no variant would export, so stop and say so
        raise
    except Exception as error:  # an exporter limit of one variant should not stop the others
        print(f"  no ONNX export for {folder.name}: {type(error).__name__}: {error}")
        shutil.rmtree(path.parent, ignore_errors=True)
        return False
    return True


def build_folder(args, variant: str, template: str, namespace: str) -> Path:
    model, weights_source = build_model(args, variant)
    repo_id = f"{namespace}/{variant}"
    out = Path(args.output_dir) / variant
    result = None
    results_file = Path(args.results_dir) / variant / RESULTS_FILE if args.results_dir else None
    if results_file is not None and results_file.exists():
        result = json.loads(results_file.read_text())
        check_measured_on(result, model, str(results_file))  # model-index only for these very weights
    model.save_pretrained(out)  # safetensors + config.json with auto_map + modeling code
    OffSegImageProcessor().save_pretrained(out)
    write_endpoint_files(out, variant)  # handler.py + requirements.txt for Inference Endpoints
    exported = args.onnx and export_onnx_file(model, out, args.onnx_opset)
    card = render_card(
        template,
        variant,
        repo_id,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmac=count_gmac(model),
        num_labels=model.config.num_labels,
        dataset_name=args.dataset_name,
        dataset_pretty_name=args.dataset_pretty_name,
        weights_source=weights_source,
        result=result,
        space_id=args.space_id,
        onnx_opset=args.onnx_opset if exported else None,
    )
    card.save(out / "README.md")
    return out


def build_space(folder: Path, space_id: str, model_ids: list[str], args) -> Path:
    """The demo Space: examples/app.py as app.py, told by app_config.json to offer `model_ids` and download them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(space_readme(space_id, model_ids, args.gradio_version))
    shutil.copyfile(APP, folder / "app.py")
    (folder / "app_config.json").write_text(json.dumps({"models": model_ids, "allow_download": True}, indent=2))
    (folder / "requirements.txt").write_text("\n".join(space_requirements(args.variants)) + "\n")
    images = folder / "example_images"  # scenes of the synthetic demo set, drawn here (no download)
    images.mkdir(exist_ok=True)
    for index in range(3):
        pixels, _ = generate_scene(np.random.default_rng([args.seed, 1, index]), 256, 256)
        Image.fromarray(pixels).save(images / f"scene_{index}.png")
    return folder


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    api = None
    namespace = args.hub_namespace or "offseg-hf"
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=args.hub_token)
        namespace = args.hub_namespace or api.whoami()["name"]  # the card names the repo it is uploaded to
    if args.space_dir is not None and args.space_id is None:
        args.space_id = f"{namespace}/{DEFAULT_SPACE_NAME}"
    template = Path(args.card_template).read_text()
    folders = []
    for variant in args.variants:
        folder = build_folder(args, variant, template, namespace)
        folders.append(folder)
        print(f"{variant}: {folder}")
        if api is not None:
            repo_id = f"{namespace}/{variant}"
            api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"Upload {variant}")
            print(f"  uploaded to https://huggingface.co/{repo_id}")
    if args.space_dir is not None:
        space = build_space(Path(args.space_dir), args.space_id, [f"{namespace}/{v}" for v in args.variants], args)
        print(f"Space {args.space_id}: {space}")
        if api is not None:
            api.create_repo(
                args.space_id, repo_type="space", space_sdk="gradio", private=args.hub_private_repo, exist_ok=True
            )
            api.upload_folder(
                folder_path=str(space), repo_id=args.space_id, repo_type="space", commit_message="Upload the demo"
            )
            print(f"  uploaded to https://huggingface.co/spaces/{args.space_id}")
    return folders


if __name__ == "__main__":
    main()
