"""Build (and upload) one Hub repo per variant: SegFormer-offset B0..B5 and OffSeg-T/B/L.

    # folders only, no network: converted or trained weights from DIR/<variant>/, results from RESULTS/<variant>.json
    python examples/push_to_hub.py --local_dir hub/ --weights_dir converted/ --results_dir results/
    # upload (network, `huggingface-cli login` first)
    python examples/push_to_hub.py --local_dir hub/ --weights_dir converted/ --namespace my-org

Each folder holds the weights as safetensors, config.json with `auto_map`, the modeling code (so
`trust_remote_code=True` loads it without offseg-hf), preprocessor_config.json, and a README.md rendered from
MODEL_CARD.md with Hub metadata (license, tags, datasets, pipeline_tag, widget images, and `model-index` only
from a results JSON measured on those weights by examples/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from offseg_hf import VARIANTS, OffSegConfig, OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.hub import check_measured_on, count_gmac, render_card


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", required=True, help="Write one folder per variant here.")
    parser.add_argument("--variants", nargs="+", default=sorted(VARIANTS), choices=sorted(VARIANTS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights_dir", help="Folder with one saved model per variant: DIR/<variant>/.")
    source.add_argument("--random_init", action="store_true", help="Fresh random weights (to test the repos).")
    parser.add_argument(
        "--config_overrides",
        default=None,
        help='JSON {"segformer": {...}, "offseg": {...}} applied to --random_init models.',
    )
    parser.add_argument(
        "--results_dir",
        default=None,
        help="evaluate.py JSON per variant: DIR/<variant>.json, measured on the same weights (checked by fingerprint).",
    )
    parser.add_argument("--dataset_id", default="scene_parse_150", help="Hub id of the training data set.")
    parser.add_argument("--dataset_name", default="ADE20K")
    parser.add_argument("--namespace", default=None, help="Upload to <namespace>/<variant> (needs a network).")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--card_template", default=str(Path(__file__).resolve().parents[1] / "MODEL_CARD.md"))
    return parser.parse_args(argv)


def build_model(args, variant: str) -> tuple[OffSegForSemanticSegmentation, str]:
    if args.random_init:
        family = VARIANTS[variant]["decode_head"]
        overrides = json.loads(args.config_overrides or "{}").get(family, {})
        torch.manual_seed(0)
        config = OffSegConfig.from_variant(variant, **overrides)
        return OffSegForSemanticSegmentation(config).eval(), "random initialisation (for testing; not trained)"
    folder = Path(args.weights_dir) / variant
    if not folder.is_dir():
        raise FileNotFoundError(f"No saved model for {variant!r} at {folder}.")
    return OffSegForSemanticSegmentation.from_pretrained(folder).eval(), f"from `{folder.name}`"


def build_folder(args, variant: str, template: str) -> Path:
    model, weights_source = build_model(args, variant)
    repo_id = f"{args.namespace or 'offseg-hf'}/{variant}"
    out = Path(args.local_dir) / variant
    result = None
    results_file = Path(args.results_dir) / f"{variant}.json" if args.results_dir else None
    if results_file is not None and results_file.exists():
        result = json.loads(results_file.read_text())
        check_measured_on(result, model, str(results_file))  # model-index only for these very weights
    model.save_pretrained(out)  # safetensors + config.json with auto_map + modeling code
    OffSegImageProcessor().save_pretrained(out)
    card = render_card(
        template,
        variant,
        repo_id,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmac=count_gmac(model),
        num_labels=model.config.num_labels,
        dataset_id=args.dataset_id,
        dataset_name=args.dataset_name,
        weights_source=weights_source,
        result=result,
    )
    card.save(out / "README.md")
    return out


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    template = Path(args.card_template).read_text()
    folders = []
    for variant in args.variants:
        folder = build_folder(args, variant, template)
        folders.append(folder)
        print(f"{variant}: {folder}")
        if args.namespace:
            from huggingface_hub import HfApi

            api = HfApi()
            repo_id = f"{args.namespace}/{variant}"
            api.create_repo(repo_id, private=args.private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"Upload {variant}")
            print(f"  uploaded to https://huggingface.co/{repo_id}")
    return folders


if __name__ == "__main__":
    main()
