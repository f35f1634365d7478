#!/usr/bin/env python
"""Build (and upload) Hub repos of saved models: a model folder as trained, converted variants, or fresh presets
(SegFormer-offset B0..B5, OffSeg-T/B/L, SegNeXt-T/S/B offset and per-pixel, Mask2Former Swin-T offset and plain).

    # a trained folder, published as it is (folders only, no network): hub/demo-segformer-b0-offset/
    python examples/push_to_hub.py --output_dir hub/ --model_dir outputs/demo-segformer-b0-offset
    # converted variants converted/<variant>/ (every one there, or --variants), results from results/<variant>/
    python examples/push_to_hub.py --output_dir hub/ --weights_dir converted/ --results_dir results/
    # upload (network; `hf auth login` first, or --hub_token)
    python examples/push_to_hub.py --output_dir hub/ --weights_dir converted/ --results_dir results/ \\
        --push_to_hub --hub_namespace my-org

A saved model is published exactly as it is: its weights, its config.json and its preprocessor_config.json (the
image size it was trained at) travel unchanged, and a repo is named after its folder. Each folder holds the
weights as safetensors, config.json with `auto_map`, the modeling code (so `trust_remote_code=True` loads it
without offseg-hf), preprocessor_config.json, and a README.md rendered from MODEL_CARD.md with Hub metadata
(license, tags, datasets, pipeline_tag, and `model-index` only from an eval_results.json measured on those very
weights: the model folder's own, which train.py writes, or DIR/<name>/ of --results_dir).

What the model does, shown on its page: the folder's own model and image processor (loaded back from the folder
written) segment the photos shipped in offseg_hf/hub/example_images/ (public domain or CC0); `examples/<photo>.jpg` and
`examples/<photo>_prediction.png` (the overlay with a legend) go into the repo, the card's `widget:` pairs each photo
with its prediction (`output.url`, which the Hub shows where no provider runs the model) and its gallery shows them.
`--no_examples` skips them (faster; no widget, no gallery). A --random_init card says its pictures are from random
weights.

Each folder also carries `handler.py` + `requirements.txt` for Inference Endpoints (Hub widgets do not run
custom-code models, so the cards say so and point to the endpoint handler, the ONNX file and the demo Space);
`--onnx` adds `onnx/model.onnx` (offseg_hf.export.onnx.export_onnx, dynamic batch/height/width). `--space_dir DIR`
writes
a Gradio Space folder (README.md with Space metadata and `models:` listing the repos, app.py = examples/app.py,
app_config.json, requirements.txt, example images); with `--push_to_hub` it is uploaded as `--space_id`
(default <namespace>/offseg-demo), which the cards link.

    python examples/push_to_hub.py --output_dir hub/ --random_init --variants segformer-b0-offset --onnx \\
        --space_dir space/

`--random_init` builds untrained repos to try the pipeline: at full size that writes about 1.9 GB for all 17
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
from transformers import AutoModelForSemanticSegmentation, PreTrainedModel

from offseg_hf import OffSegConfig, OffSegImageProcessor
from offseg_hf.data.demo import generate_scene
from offseg_hf.hub.examples import EXAMPLES_DIR, render_examples
from offseg_hf.hub.repos import (
    ADE20K_DATA_SET,
    DEMO_DATA_SET,
    check_measured_on,
    count_gmac,
    default_data_set,
    render_card,
    space_readme,
    space_requirements,
    write_endpoint_files,
)
from offseg_hf.presets import all_variant_names, model_for_variant, variant_family

RESULTS_FILE = "eval_results.json"  # what train.py and evaluate_segmentation.py write into their --output_dir
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
# Config values that tell the presets' model families and classifiers apart (a folder's sizes may differ from its
# preset's: the card measures parameters and multiply-adds on the model itself).
KIND_KEYS = ("model_type", "decode_head", "classifier", "offset_learning")
# The recipes (of train.py or evaluate_segmentation.py, as eval_results.json records them) that go with ADE20K, the
# default data set of a model without the demo set's classes; a result of any other recipe means other data.
ADE20K_RECIPES = (None, "ade20k-160k")
APP = Path(__file__).resolve().parent / "app.py"  # the Gradio demo, the Space's app.py
DEFAULT_SPACE_NAME = "offseg-demo"
ONNX_FILE = "onnx/model.onnx"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Write one repo folder per model here, OUTPUT_DIR/<name>.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model_dir",
        nargs="+",
        metavar="DIR",
        help="Saved model folders, each published as it is (weights, config.json, preprocessor_config.json, its own "
        f"{RESULTS_FILE} on the card) under the folder's name: train.py's output (e.g. "
        "outputs/demo-segformer-b0-offset) or a converted variant.",
    )
    source.add_argument(
        "--weights_dir",
        help="Folder of saved models named after their variants, DIR/<variant>/ (python -m offseg_hf.convert "
        "--output_dir DIR/<variant>): every variant found there, or the --variants named.",
    )
    source.add_argument(
        "--random_init",
        action="store_true",
        help="Fresh random weights, to test the repos (about 1.9 GB for all 17 variants at full size).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="Variants to build: with --random_init (default: all presets) or --weights_dir (default: those it "
        "holds); with --model_dir, the variant of each folder in order (default: read from the folder name's end, "
        "as in train.py's outputs/<recipe>-<variant>).",
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
        help=f"DIR/<name>/{RESULTS_FILE} from evaluate_segmentation.py --output_dir DIR/<name>, measured on the "
        "same weights (checked by fingerprint); it replaces the model folder's own. Models with neither get no "
        "results on their card.",
    )
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="Hub id of the data set the weights were trained on. Default: offseg-demo (the synthetic demo set, no "
        "Hub data set) for a model with the demo set's classes, else scene_parse_150 (ADE20K), which a model whose "
        f"{RESULTS_FILE} names another recipe than ade20k-160k cannot default to: name its data.",
    )
    parser.add_argument(
        "--dataset_pretty_name",
        default=None,
        help="Its name as the card shows it (default: ADE20K for scene_parse_150, else --dataset_name).",
    )
    parser.add_argument(
        "--card_template",
        default=str(Path(__file__).resolve().parents[1] / "MODEL_CARD.md"),
        help="Model card template with {placeholders}.",
    )
    parser.add_argument(
        "--no_examples",
        action="store_true",
        help=f"Skip the example predictions (faster): by default each folder's own model segments the photos shipped "
        f"in offseg_hf/hub/example_images/ into {EXAMPLES_DIR}/, which the card's widget and gallery show.",
    )
    extras = parser.add_argument_group("deployment extras")
    extras.add_argument(
        "--onnx",
        action="store_true",
        help=f"Also export each model to {ONNX_FILE} (offseg_hf.export.onnx.export_onnx, dynamic batch/height/width; "
        "needs offseg-hf's onnx extra). A variant the exporter cannot handle gets no ONNX file and a card that says "
        "so.",
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
    hub.add_argument("--push_to_hub", action="store_true", help="Upload each folder to <namespace>/<name>.")
    hub.add_argument(
        "--hub_namespace",
        default=None,
        help="User or organisation of the repos (default: the logged-in user when pushing; the cards' repo ids "
        "read offseg-hf/<name> otherwise).",
    )
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repos as private.")
    hub.add_argument("--hub_token", default=None, help="Hub token (else the logged-in one).")
    return parser


class Source:
    """One repo to build: its name (the repo's and the output folder's), its variant, the saved model folder it
    publishes (None: fresh random weights); argument checking adds the eval_results.json its card reports (None:
    none) and the data set the card names."""

    # A plain class, not a dataclass: tests load this script by path, outside sys.modules, where dataclass fails.
    def __init__(self, name: str, variant: str, folder: Path | None = None):
        self.name, self.variant, self.folder = name, variant, folder
        self.results: Path | None = None
        self.dataset: tuple[str, str] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work; a bad one ends the script with one line. Sets
    `args.sources`, one `Source` per repo to build."""
    parser = build_parser()
    args = parser.parse_args(argv)
    known = all_variant_names()
    unknown = [variant for variant in args.variants or () if variant not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(known)}.")
    if args.model_dir is not None:
        args.sources = _model_dir_sources(parser, args.model_dir, args.variants)
    elif args.weights_dir is not None:
        args.sources = _weights_dir_sources(parser, Path(args.weights_dir), args.variants, known)
    else:
        args.sources = [Source(variant, variant) for variant in args.variants or known]
    args.variants = [source.variant for source in args.sources]
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
    if args.results_dir is not None and not Path(args.results_dir).is_dir():
        parser.error(f"--results_dir {args.results_dir} is not a folder.")
    for source in args.sources:
        _find_results(parser, source, args.results_dir)
        _find_data_set(parser, source, args)
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


def _model_dir_sources(parser, folders: list[str], variants: list[str] | None) -> list[Source]:
    """--model_dir: each folder under its own name, its variant given or read from the end of its name."""
    if variants is not None and len(variants) != len(folders):
        parser.error(
            f"--variants with --model_dir names each folder's variant: {len(folders)} folders, "
            f"{len(variants)} variants."
        )
    sources = []
    for index, folder in enumerate(map(Path, folders)):
        if not folder.is_dir():
            parser.error(f"--model_dir {folder} is not a folder.")
        name = folder.resolve().name
        if variants is not None:
            variant = variants[index]
        else:  # the longest preset name the folder's name ends with: "demo-segnext-t-offset" is segnext-t-offset
            matches = [v for v in all_variant_names() if name == v or name.endswith(f"-{v}")]
            if not matches:
                parser.error(f"--model_dir {folder}: its name ends with no variant's; name it with --variants.")
            variant = max(matches, key=len)
        _check_model_folder(parser, folder, variant)
        sources.append(Source(name, variant, folder))
    names = [source.name for source in sources]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        parser.error(f"--model_dir: two folders named {twice[0]!r} would be one repo.")
    return sources


def _weights_dir_sources(parser, root: Path, variants: list[str] | None, known: list[str]) -> list[Source]:
    """--weights_dir: root/<variant> for the variants asked for, or for every variant root holds."""
    if not root.is_dir():
        parser.error(f"--weights_dir {root} is not a folder.")
    if variants is None:
        variants = [variant for variant in known if (root / variant / CONFIG_FILE).is_file()]
        if not variants:
            parser.error(
                f"--weights_dir {root} holds no saved variant ({root}/<variant>/{CONFIG_FILE}); for a folder "
                "train.py wrote, use --model_dir."
            )
    missing = [variant for variant in variants if not (root / variant).is_dir()]
    if missing:
        parser.error(f"--weights_dir {root} has no folder for {', '.join(missing)}.")
    for variant in variants:
        _check_model_folder(parser, root / variant, variant)
    return [Source(variant, variant, root / variant) for variant in variants]


def _check_model_folder(parser, folder: Path, variant: str) -> None:
    """A saved model of `variant`'s family and classifier, with the processor it is published with."""
    for file in (CONFIG_FILE, PROCESSOR_FILE):
        if not (folder / file).is_file():
            parser.error(
                f"{folder} has no {file}: not a saved model folder (train.py --output_dir and python -m "
                "offseg_hf.convert.official --output_dir write both files)."
            )
    config = _read_json(folder / CONFIG_FILE, parser)
    preset = OffSegConfig.from_variant(variant).to_dict()
    differing = [key for key in KIND_KEYS if preset.get(key) is not None and config.get(key) != preset[key]]
    if differing:
        key = differing[0]
        parser.error(f"{folder} holds no {variant}: its {key} is {config.get(key)!r}, the preset's {preset[key]!r}.")


def _find_results(parser, source: Source, results_dir: str | None) -> None:
    """The card's results: --results_dir's for this name, else the model folder's own (train.py's)."""
    candidates = [Path(results_dir) / source.name / RESULTS_FILE] if results_dir else []
    if source.folder is not None:
        candidates.append(source.folder / RESULTS_FILE)
    source.results = next((path for path in candidates if path.is_file()), None)
    if source.results is not None and "weights_sha256" not in _read_json(source.results, parser):
        parser.error(f"{source.results} names no weights_sha256: write it with examples/evaluate_segmentation.py.")


def _find_data_set(parser, source: Source, args) -> None:
    """(Hub id or name, name shown) of the data the card says the model was trained on."""
    if args.dataset_name is not None:
        shown = {name: pretty for name, pretty in (DEMO_DATA_SET, ADE20K_DATA_SET)}.get(args.dataset_name)
        source.dataset = (args.dataset_name, args.dataset_pretty_name or shown or args.dataset_name)
        return
    if source.folder is not None:
        id2label = _read_json(source.folder / CONFIG_FILE, parser).get("id2label", {})
    else:
        overrides = args.config_overrides.get(variant_family(source.variant), {})
        id2label = OffSegConfig.from_variant(source.variant, **overrides).id2label
    source.dataset = default_data_set(id2label)
    recipe = _read_json(source.results, parser).get("recipe") if source.results else None
    if source.dataset == ADE20K_DATA_SET and recipe not in ADE20K_RECIPES:
        parser.error(
            f"{source.results} was measured with recipe {recipe!r}, not on ADE20K: name the data set the weights "
            "were trained on with --dataset_name."
        )
    if args.dataset_pretty_name is not None:
        source.dataset = (source.dataset[0], args.dataset_pretty_name)


def _read_json(path: Path, parser: argparse.ArgumentParser) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        parser.error(f"{path} is not JSON: {error}")


def build_model(args, source: Source) -> tuple[PreTrainedModel, str]:
    """The model and the card's line about where its weights come from."""
    if source.folder is None:
        overrides = args.config_overrides.get(variant_family(source.variant), {})
        torch.manual_seed(args.seed)
        return model_for_variant(source.variant, **overrides).eval(), "random initialisation (for testing; not trained)"
    model = AutoModelForSemanticSegmentation.from_pretrained(source.folder).eval()
    result = json.loads(source.results.read_text()) if source.results else {}
    if result.get("measured_by", "").startswith("examples/train.py"):
        return model, (
            f"trained by offseg-hf's `examples/train.py` (recipe `{result.get('recipe')}`, {result.get('step')} "
            f"steps), folder `{source.folder.resolve().name}`"
        )
    return model, f"from `{source.folder.resolve().name}`"


def copy_saved_files(source: Path, out: Path) -> None:
    """The folder's config.json and preprocessor_config.json as they are: the processor's size is the one the
    model was trained at, and a re-saved config rewrites its nested sub-configs. Only `auto_map`, which the remote
    code needs, comes from the fresh save where the folder's differs."""
    shutil.copyfile(source / PROCESSOR_FILE, out / PROCESSOR_FILE)
    config, saved = json.loads((source / CONFIG_FILE).read_text()), json.loads((out / CONFIG_FILE).read_text())
    if config.get("auto_map") == saved.get("auto_map"):
        shutil.copyfile(source / CONFIG_FILE, out / CONFIG_FILE)
    else:
        config["auto_map"] = saved["auto_map"]
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_onnx_file(model: PreTrainedModel, folder: Path, opset: int) -> bool:
    """Write folder/onnx/model.onnx; False (and no file) where the exporter fails on this model."""
    from offseg_hf.export.onnx import export_onnx

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


def build_folder(args, source: Source, template: str, namespace: str) -> Path:
    model, weights_source = build_model(args, source)
    repo_id = f"{namespace}/{source.name}"
    out = Path(args.output_dir) / source.name
    result = None
    if source.results is not None:
        result = json.loads(source.results.read_text())
        check_measured_on(result, model, str(source.results))  # model-index only for these very weights
    model.save_pretrained(out)  # safetensors + config.json with auto_map + modeling code
    if source.folder is not None:
        copy_saved_files(source.folder, out)
    else:
        OffSegImageProcessor().save_pretrained(out)
    write_endpoint_files(out, source.variant)  # handler.py + requirements.txt for Inference Endpoints
    exported = args.onnx and export_onnx_file(model, out, args.onnx_opset)
    # Rendered by the model and processor loaded back from `out`: the pictures are those of the files uploaded.
    examples = [] if args.no_examples else render_examples(out)
    dataset_name, dataset_pretty_name = source.dataset
    card = render_card(
        template,
        source.variant,
        repo_id,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmac=count_gmac(model),
        num_labels=model.config.num_labels,
        dataset_name=dataset_name,
        dataset_pretty_name=dataset_pretty_name,
        weights_source=weights_source,
        result=result,
        space_id=args.space_id,
        onnx_opset=args.onnx_opset if exported else None,
        examples=examples,
        random_weights=source.folder is None,
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
    for source in args.sources:
        folder = build_folder(args, source, template, namespace)
        folders.append(folder)
        print(f"{source.name} ({source.variant}): {folder}")
        if api is not None:
            repo_id = f"{namespace}/{source.name}"
            api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"Upload {source.name}")
            print(f"  uploaded to https://huggingface.co/{repo_id}")
    if args.space_dir is not None:
        model_ids = [f"{namespace}/{source.name}" for source in args.sources]
        space = build_space(Path(args.space_dir), args.space_id, model_ids, args)
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
